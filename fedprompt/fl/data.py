"""What each side of a simulation reads: clients their partition and the public pool, the server its
evaluation split. Every ClientApp recomputes the same seeded partition and keeps partition
``node_config["partition-id"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from fedprompt.data import Example, Partition, TaskSpec


@dataclass(frozen=True)
class ClientData:
    spec: TaskSpec
    partition: Partition
    public: list[Example]


def load_task_and_spec(cfg: DictConfig):
    """The task's data and its spec in the model's chat format (as ``fedprompt eval`` shows it)."""
    from fedprompt.cli import load_task_checked  # lazy: fedprompt.cli imports this package's command

    task = load_task_checked(cfg)
    return task, task.spec.with_chat_format(cfg.model.get("chat_format"))


def training_examples(cfg: DictConfig, task, spec: TaskSpec) -> list[Example]:
    """The train split, or its seeded k-shot sample (``partition.k_shot`` per class) before partitioning."""
    from fedprompt.data import sample_k_shot

    examples = task.split("train")
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


def public_examples(cfg: DictConfig, task, spec: TaskSpec) -> list[Example]:
    """A class-balanced pool from ``federation.public_split`` that every client may score prompts on."""
    from fedprompt.data import sample_balanced

    size = int(cfg.federation.public_size)
    if size == 0:
        return []
    return sample_balanced(task.split(str(cfg.federation.public_split)), size, spec.num_labels, seed=int(cfg.seed) + 1)


def eval_examples(cfg: DictConfig, task) -> list[Example]:
    examples = task.split(str(cfg.federation.eval_split))
    limit = cfg.federation.get("eval_limit")
    return examples if limit is None else examples[: int(limit)]


def client_data(cfg: DictConfig) -> ClientData:
    """All partitions and the public pool of this run (the ClientApp caches it per process)."""
    task, spec = load_task_and_spec(cfg)
    partition = make_partition(cfg, training_examples(cfg, task, spec), spec.num_labels)
    return ClientData(spec, partition, public_examples(cfg, task, spec))
