"""Tasks (templates, verbalizers), loading (JSONL folder or HF hub), sampling and partitioning."""

from fedprompt.data.dataset import TaskData, load_task
from fedprompt.data.loading import DATA_DIR_ENV
from fedprompt.data.partition import Partition, partition_examples, validate_partition_args
from fedprompt.data.sampling import label_histogram, sample_balanced, sample_k_shot
from fedprompt.data.task import Example, TaskSpec, task_from_config

__all__ = [
    "DATA_DIR_ENV",
    "Example",
    "Partition",
    "TaskData",
    "TaskSpec",
    "label_histogram",
    "load_task",
    "partition_examples",
    "sample_balanced",
    "sample_k_shot",
    "task_from_config",
    "validate_partition_args",
]
