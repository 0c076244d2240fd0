"""``load_task``: a task's spec and its splits, from a local folder or the hub, validated up front."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedprompt.data.loading import SPLITS, load_hub_split, read_jsonl_split, read_meta, resolve_task_dir
from fedprompt.data.task import Example, TaskSpec, task_from_config
from fedprompt.errors import DataError


@dataclass
class TaskData:
    """A task's :class:`TaskSpec` and lazily read, cached splits."""

    spec: TaskSpec
    folder: Path | None
    task_cfg: Mapping[str, Any]
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    @property
    def source(self) -> str:
        return str(self.folder) if self.folder else f"hf:{(self.task_cfg.get('hf') or {}).get('path')}"

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; choose one of {list(SPLITS)}")
        if name not in self._cache:
            if self.folder is not None:
                rows = read_jsonl_split(self.folder / f"{name}.jsonl", self.spec.num_labels, self.spec.is_pair)
            else:
                rows, _ = load_hub_split(self.task_cfg, name)
            self._cache[name] = rows
        return self._cache[name]


def load_task(task_cfg: Mapping[str, Any], data_dir: str | os.PathLike | None = None) -> TaskData:
    """Resolve the task's data source, read its label names, and build its :class:`TaskSpec`.

    Label names come from ``task.labels`` when the config sets them (a dataset whose meta.json names its
    classes badly can be fixed without rewriting its files: the i-th name is class i), else from the
    folder's meta.json (so any folder in the shared format works without code changes), else from the hub
    dataset's features. Names given in the config must be as many as the data's classes.
    """
    folder = resolve_task_dir(task_cfg, data_dir)
    cfg_labels = list(task_cfg.get("labels") or [])
    labels: list[str]
    if folder is not None:
        labels, source = read_meta(folder)["labels"], f"{folder}/meta.json"
    elif cfg_labels:
        return TaskData(spec=task_from_config(task_cfg, cfg_labels), folder=None, task_cfg=task_cfg)
    else:
        labels, source = load_hub_split(task_cfg, "train")[1], f"the hub dataset {(task_cfg.get('hf') or {}).get('path')}"
    if cfg_labels and len(cfg_labels) != len(labels):
        raise DataError(
            f"task {task_cfg['name']!r}: task.labels names {len(cfg_labels)} classes {cfg_labels}, but {source} has "
            f"{len(labels)} {labels}; give one name per class, in class-index order"
        )
    return TaskData(spec=task_from_config(task_cfg, cfg_labels or labels), folder=folder, task_cfg=task_cfg)
