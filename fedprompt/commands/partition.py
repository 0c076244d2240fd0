"""``fedprompt partition``: the run's partitions written to one folder each (layout: fedprompt.runs.node_data),
for SuperNodes that hold and read only their own data; ``fedprompt deploy`` writes them for its local
SuperNodes too. Same rows, same order and same checks as the partition ``fedprompt run`` builds in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fedprompt.data import Example
from fedprompt.errors import ConfigError
from fedprompt.runs.node_data import (
    INFO,
    META,
    PUBLIC,
    SUMMARY,
    TRAIN,
    node_config_line,
    partition_folder,
    partition_settings,
    public_settings,
)


def _row(example: Example) -> str:
    row: dict[str, Any] = {"text": example.text}
    if example.text_pair is not None:
        row["text_pair"] = example.text_pair
    row["label"] = example.label
    return json.dumps(row, ensure_ascii=False) + "\n"


def _write_rows(path: Path, examples: list[Example]) -> None:
    path.write_text("".join(_row(e) for e in examples), encoding="utf-8")


def write_partitions(cfg: DictConfig, out: str | Path) -> dict:
    """Write one folder per partition of the run ``cfg`` under ``out`` (module docstring); returns the summary.

    The partition is the one ``fedprompt run`` builds in-process (same rows, same order, same checks: a client
    without examples or training rows that share content with the evaluation split are refused)."""
    from fedprompt.runs.data import (
        check_no_leak,
        checked_partition,
        load_task_and_spec,
        overlap_excluded,
        public_examples,
        training_examples,
    )

    out = Path(out)
    task, spec = load_task_and_spec(cfg)
    train = training_examples(cfg, task, spec)
    partition = checked_partition(cfg, train, spec.num_labels)
    public = public_examples(cfg, task, spec)
    check_no_leak(cfg, task, train, public)
    num = len(partition.clients)
    settings, pool = partition_settings(cfg), public_settings(cfg)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for i, examples in enumerate(partition.clients):
        folder = partition_folder(out, i)
        folder.mkdir(mode=0o700, exist_ok=True)  # one organisation's rows: not for the other users of this host
        _write_rows(folder / TRAIN, examples)
        if public:
            _write_rows(folder / PUBLIC, public)
        (folder / META).write_text(json.dumps({"task": spec.name, "labels": list(spec.labels)}, indent=2) + "\n")
        (folder / INFO).write_text(json.dumps({
            "task": spec.name, "partition_id": i, "num_partitions": num, "num_examples": len(examples),
            "label_histogram": partition.histograms[i], **settings, "public": pool,
        }, indent=2) + "\n")
        folders.append(folder.resolve())
    summary = {"task": spec.name, "data": task.source, "num_partitions": num, "train_examples": len(train),
               **settings, "public": pool, **partition.summary(),
               "eval_overlap_excluded": overlap_excluded(cfg, task)}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "output_dir": str(out.resolve()),
            "node_configs": [node_config_line(i, num, folder) for i, folder in enumerate(folders)]}


def remove_partitions(out: str | Path) -> None:
    """Delete what :func:`write_partitions` wrote under ``out`` (a deployment's own copy, before it rewrites it)."""
    out = Path(out)
    for folder in out.glob("partition_*"):
        if folder.is_dir():
            shutil.rmtree(folder)
    (out / SUMMARY).unlink(missing_ok=True)


def cmd_partition(cfg: DictConfig) -> dict:
    """``fedprompt partition``: the run's partitions, one folder each, for SuperNodes with their own data."""
    import time

    from fedprompt.config import check_writable_dir
    from fedprompt.runs.run_config import validate_config

    validate_config(cfg)
    if cfg.get("output_dir"):
        out = Path(str(cfg.output_dir)).expanduser()
    else:
        out = (Path("outputs") / "partition" /
               f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.task.name}-{int(cfg.federation.num_clients)}")
    check_writable_dir(out)
    if (out / SUMMARY).exists() or any(out.glob("partition_*")):
        raise ConfigError(f"output_dir={str(out)!r} already holds partitions; choose a new folder (partitions are "
                          "never overwritten: a SuperNode may be reading them)")
    return write_partitions(cfg, out)
