"""Split a task's examples across N federated clients with flwr-datasets' partitioners.

Schemes: ``iid``, ``dirichlet`` (label skew, concentration ``alpha``: small alpha = very non-IID) and
``pathological`` (each client sees ``classes_per_client`` classes). All seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from fedprompt.data.sampling import label_histogram
from fedprompt.data.task import Example
from fedprompt.errors import ConfigError

SCHEMES = ("iid", "dirichlet", "pathological")


@dataclass(frozen=True)
class Partition:
    """The clients' example lists and, per client, how many examples of each class it holds."""

    clients: list[list[Example]]
    histograms: list[list[int]]

    def summary(self) -> dict:
        return {"num_clients": len(self.clients), "sizes": [len(c) for c in self.clients], "label_histograms": self.histograms}


def validate_partition_args(
    num_examples: int,
    num_clients: int,
    scheme: str,
    alpha: float | None = None,
    classes_per_client: int | None = None,
    num_labels: int | None = None,
    min_size: int = 1,
) -> None:
    """Cheap checks, run before any model is loaded."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_examples:
        raise ConfigError(
            f"{num_clients} clients but only {num_examples} training examples: every client needs data; "
            f"lower federation.num_clients or raise k"
        )
    if scheme == "dirichlet":
        # inf/nan would reach flwr-datasets, which retries its draw until "max attempts"
        if alpha is None or not 0 < alpha < math.inf:
            raise ConfigError(f"Dirichlet alpha must be > 0 and finite (small = more non-IID; for IID use "
                              f"partition=iid), got partition.alpha={alpha}")
        if min_size * num_clients > num_examples:
            raise ConfigError(
                f"partition.min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
                f"examples, only {num_examples} available; lower min_size or the number of clients"
            )
    if scheme == "pathological":
        if classes_per_client is None or classes_per_client < 1:
            raise ConfigError(f"pathological partitioning needs classes_per_client >= 1, got {classes_per_client}")
        if num_labels is not None and classes_per_client > num_labels:
            raise ConfigError(f"classes_per_client={classes_per_client} exceeds the task's {num_labels} classes")


def partition_examples(
    examples: Sequence[Example],
    num_clients: int,
    num_labels: int,
    scheme: str = "iid",
    *,
    alpha: float | None = None,
    classes_per_client: int | None = None,
    seed: int = 0,
    min_size: int = 1,
) -> Partition:
    """Assign every example to one of ``num_clients`` clients with the chosen flwr-datasets partitioner."""
    validate_partition_args(len(examples), num_clients, scheme, alpha, classes_per_client, num_labels, min_size)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    table = Dataset.from_dict({"idx": list(range(len(examples))), "label": [e.label for e in examples]})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        table = table.shuffle(seed=seed)  # IidPartitioner cuts contiguous shards: shuffle first
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha, min_partition_size=min_size, seed=seed
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients, partition_by="label", num_classes_per_partition=classes_per_client, seed=seed
        )
    partitioner.dataset = table
    clients = [[examples[i] for i in partitioner.load_partition(cid)["idx"]] for cid in range(num_clients)]
    return Partition(clients=clients, histograms=[label_histogram(c, num_labels) for c in clients])
