"""What each side of a simulation reads: clients their partition and the public pool, the server its
evaluation examples and the validation examples that decide the run's reference. In a simulation every
ClientApp recomputes the same seeded partition and keeps partition ``node_config["partition-id"]``; a SuperNode
whose node config names a ``data-dir`` reads only that folder, its own partition (fedprompt.runs.node_data).

No set a run learns or chooses from may share content with the evaluation examples
(fedprompt.data.leakage): ``federation.eval_overlap=refuse`` (default) stops the run before launch,
``exclude`` drops those rows from the learning sources before anything is sampled from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig

from fedprompt.config import load_task_checked
from fedprompt.data import Example, Partition, TaskSpec, label_histogram


@dataclass(frozen=True)
class ClientData:
    """A client process's data: every partition (a simulation builds them all), or, on a SuperNode with its own
    ``data-dir``, only partition ``own`` (the other partitions' lists are empty: that node never saw them)."""

    spec: TaskSpec
    partition: Partition
    public: list[Example]
    own: int | None = None


def load_task_and_spec(cfg: DictConfig):
    """The task's data and its spec in the model's chat format (as ``fedprompt eval`` shows it)."""
    task = load_task_checked(cfg)
    return task, task.spec.with_chat_format(cfg.model.get("chat_format"))


def _learning_source(cfg: DictConfig, task, split: str) -> list[Example]:
    """A split a run learns or chooses from, minus the evaluation examples' content under ``exclude`` or when it
    is the evaluation split itself (a public pool on validation while stage 1 scores on validation)."""
    from fedprompt.data.leakage import without

    examples = task.split(split)
    if cfg.federation.get("eval_overlap", "refuse") == "exclude" or split == str(cfg.federation.eval_split):
        examples = without(examples, eval_keys(cfg, task))
    return examples


def eval_keys(cfg: DictConfig, task) -> set[bytes]:
    from fedprompt.data.leakage import content_key

    return {content_key(e) for e in eval_examples(cfg, task)}


def training_examples(cfg: DictConfig, task, spec: TaskSpec) -> list[Example]:
    """The train split, or its seeded k-shot sample (``partition.k_shot`` per class) before partitioning."""
    from fedprompt.data import sample_k_shot

    examples = _learning_source(cfg, task, "train")
    k = cfg.partition.get("k_shot")
    return examples if k is None else sample_k_shot(examples, int(k), spec.num_labels, seed=int(cfg.seed))


def make_partition(cfg: DictConfig, examples: list[Example], num_labels: int) -> Partition:
    from fedprompt.data import partition_examples

    part = cfg.partition
    try:
        return partition_examples(
            examples, int(cfg.federation.num_clients), num_labels, str(part.scheme),
            alpha=None if part.get("alpha") is None else float(part.alpha),
            classes_per_client=None if part.get("classes_per_client") is None else int(part.classes_per_client),
            seed=int(cfg.seed), min_size=int(part.get("min_size") or 1),
        )
    except ValueError as err:  # flwr-datasets gives up on impossible constraints (e.g. min_size under tiny alpha)
        from fedprompt.errors import ConfigError, FedPromptError

        if isinstance(err, FedPromptError):
            raise
        raise ConfigError(
            f"cannot partition {len(examples)} examples over {cfg.federation.num_clients} clients with "
            f"partition={dict(part)}: {err}. With a small alpha every client gets at least partition.min_size "
            "examples only if there are enough: raise partition.k_shot (null = the whole train split) or "
            "partition.alpha, or use fewer clients") from None


def checked_partition(cfg: DictConfig, train: list[Example], num_labels: int) -> Partition:
    """The run's partition of ``train`` (its training examples), refused in one line when a client gets nothing:
    what ``fedprompt run`` checks before launch and ``fedprompt partition`` writes."""
    from fedprompt.data import validate_partition_args
    from fedprompt.errors import ConfigError

    part = cfg.partition
    validate_partition_args(len(train), int(cfg.federation.num_clients), str(part.scheme), part.get("alpha"),
                            part.get("classes_per_client"), num_labels, int(part.get("min_size") or 1))
    partition = make_partition(cfg, train, num_labels)
    empty = [i for i, c in enumerate(partition.clients) if not c]
    if empty:
        raise ConfigError(f"clients {empty[:10]} get no training example under partition={dict(part)}; "
                          "raise partition.k_shot or alpha, or lower federation.num_clients")
    return partition


def public_examples(cfg: DictConfig, task, spec: TaskSpec) -> list[Example]:
    """A class-balanced pool from ``federation.public_split`` that every client may score prompts on."""
    from fedprompt.data import sample_balanced

    fed = cfg.federation
    size = int(fed.public_size)
    if size == 0:
        return []
    source = _learning_source(cfg, task, str(fed.public_split))
    if not source:
        from fedprompt.errors import ConfigError

        raise ConfigError(
            f"the public pool needs examples of the {fed.public_split} split, but none are left "
            "once the evaluation examples are set aside; lower federation.public_size or, when the pool and the "
            "evaluation share a split, federation.eval_limit (with eval_sample_seed) to leave rows for the pool")
    return sample_balanced(source, size, spec.num_labels, seed=int(cfg.seed) + 1)


def eval_examples(cfg: DictConfig, task) -> list[Example]:
    """``federation.eval_split``: all of it, its first ``eval_limit`` examples, or (``eval_sample_seed`` set)
    a seeded sample of ``eval_limit`` examples kept in split order (the same for every run that sets it)."""
    fed = cfg.federation
    examples = task.split(str(fed.eval_split))
    limit = fed.get("eval_limit")
    if limit is None or int(limit) >= len(examples):
        return examples
    if fed.get("eval_sample_seed") is None:
        return examples[: int(limit)]
    import numpy as np

    chosen = np.random.default_rng(int(fed.eval_sample_seed)).choice(len(examples), int(limit), replace=False)
    return [examples[i] for i in sorted(chosen)]


def reference_examples(cfg: DictConfig, task) -> list[Example]:
    """The validation examples on which the better untuned prompt (manual or zero-shot) is chosen: the first
    ``federation.reference_limit`` of the validation split. They are the evaluation examples when
    ``eval_split=validation`` (choosing on validation is the point of that stage)."""
    fed = cfg.federation
    if str(fed.eval_split) == "validation":
        return eval_examples(cfg, task)
    examples = _learning_source(cfg, task, "validation")
    limit = fed.get("reference_limit")
    return examples if limit is None else examples[: int(limit)]


def overlap_excluded(cfg: DictConfig, task) -> dict[str, int] | None:
    """Under ``eval_overlap=exclude``: how many rows of each learning split were set aside (partition.json)."""
    from fedprompt.data.leakage import overlap

    fed = cfg.federation
    if fed.get("eval_overlap", "refuse") != "exclude":
        return None
    keys = eval_keys(cfg, task)
    splits = {"train", str(fed.public_split), "validation"} - {str(fed.eval_split)}
    return {split: overlap(task.split(split), keys) for split in sorted(splits)}


def check_no_leak(cfg: DictConfig, task, train: list[Example], public: list[Example]) -> None:
    """Before launch: the clients' training examples, the public pool (which the server check scores on too)
    and the reference examples share no content with the evaluation examples (a one-line DataError)."""
    from fedprompt.data.leakage import check_disjoint

    fed = cfg.federation
    learning = {"the clients' training examples (train split)": train,
                f"the public pool ({fed.public_split} split)": public}
    if str(fed.eval_split) != "validation" and fed.get("eval_references", True):
        learning["the reference examples (validation split)"] = reference_examples(cfg, task)
    check_disjoint(learning, f"{fed.eval_split} split", eval_examples(cfg, task))


def client_data(cfg: DictConfig, node_config: Mapping[str, Any] | None = None) -> ClientData:
    """All partitions and the public pool of this run (the ClientApp caches it per process); on a node whose
    ``node_config`` names a ``data-dir``, only that folder is read (its own partition and the public pool)."""
    from fedprompt.runs.node_data import load_node_data, node_data_dir

    folder = node_data_dir(node_config)
    if folder is not None:
        assert node_config is not None  # it names the folder
        node = load_node_data(cfg, node_config, folder)
        clients: list[list[Example]] = [[] for _ in range(node.num_partitions)]
        clients[node.partition_id] = node.train
        histograms = [label_histogram(c, node.spec.num_labels) for c in clients]
        return ClientData(node.spec, Partition(clients, histograms), node.public, own=node.partition_id)
    task, spec = load_task_and_spec(cfg)
    partition = make_partition(cfg, training_examples(cfg, task, spec), spec.num_labels)
    return ClientData(spec, partition, public_examples(cfg, task, spec))
