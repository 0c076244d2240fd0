"""Loading task splits: a local folder in the shared format, or the Hugging Face hub.

A task folder holds ``{train,validation,test}.jsonl`` (one ``{"text", ["text_pair"], "label"}`` object a
line) and ``meta.json`` (``{"labels": [...], ...}``). The folder comes from ``task.path``, else
``<data_dir>/<task>``, else ``$FEDPROMPT_DATA_DIR/<task>``; with none of those set, the task's Hugging
Face dataset id (``task.hf``) is used, for users who have the hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from fedprompt.data.task import Example
from fedprompt.errors import DataError

DATA_DIR_ENV = "FEDPROMPT_DATA_DIR"
SPLITS = ("train", "validation", "test")


def resolve_task_dir(task_cfg: Mapping[str, Any], data_dir: str | os.PathLike | None) -> Path | None:
    """The local folder of a task, or ``None`` when the hub should be used.

    Raises :class:`DataError` when a folder was asked for (config or environment) but is missing, so
    a typo never silently falls back to a download.
    """
    if task_cfg.get("path"):
        folder = Path(str(task_cfg["path"])).expanduser()
        source = "task.path"
    else:
        root = data_dir if data_dir else os.environ.get(DATA_DIR_ENV)
        if not root:
            return None
        source = "data_dir" if data_dir else DATA_DIR_ENV
        root_path = Path(str(root)).expanduser()
        if not root_path.is_dir():
            raise DataError(
                f"data folder {str(root_path)!r} (from {source}) does not exist; point {source} at the folder "
                f"that holds one sub-folder per task, e.g. data_dir=../shared/data or "
                f"export {DATA_DIR_ENV}=../shared/data"
            )
        folder = root_path / str(task_cfg["name"])
    if not folder.is_dir():
        raise DataError(
            f"task folder {str(folder)!r} (from {source}) does not exist; it should hold "
            f"{{train,validation,test}}.jsonl and meta.json"
        )
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; a task folder needs meta.json with {{\"labels\": [...]}}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: not valid JSON ({err})") from None
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{meta_path}: 'labels' must be a list of at least 2 label names, got {labels!r}")
    return meta


def read_jsonl_split(path: Path, num_labels: int, is_pair: bool) -> list[Example]:
    """Read and validate one split file; a bad row raises :class:`DataError` naming file and line."""
    if not path.is_file():
        raise DataError(f"{path}: split file missing; expected one of {[s + '.jsonl' for s in SPLITS]}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            examples.append(_row_to_example(row, where, num_labels, is_pair))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def _row_to_example(row: Any, where: str, num_labels: int, is_pair: bool) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be a string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{where}: 'label' must be an integer class index, got {label!r}")
    if not 0 <= label < num_labels:
        raise DataError(f"{where}: label {label} out of range: meta.json names {num_labels} labels (0..{num_labels - 1})")
    pair = row.get("text_pair")
    if is_pair and not isinstance(pair, str):
        raise DataError(f"{where}: this is a pair task, so 'text_pair' must be a string, got {pair!r}")
    return Example(text=text, label=label, text_pair=pair if isinstance(pair, str) else None)


def load_hub_split(task_cfg: Mapping[str, Any], split: str) -> tuple[list[Example], list[str]]:
    """The same task from the Hugging Face hub (``task.hf``: path, name, fields, split names)."""
    hub = task_cfg.get("hf")
    if not hub:
        raise DataError(
            f"task {task_cfg.get('name')!r} has no local folder and no Hugging Face dataset (task.hf); set "
            f"data_dir=<folder with one sub-folder per task> or export {DATA_DIR_ENV}=../shared/data"
        )
    import datasets  # lazy: only users of the hub pay for it

    split_name = (hub.get("splits") or {}).get(split, split)
    try:
        ds = datasets.load_dataset(hub["path"], hub.get("name"), split=split_name)
    except Exception as err:  # network, missing dataset: say what to do instead
        raise DataError(
            f"could not load {hub['path']!r} split {split_name!r} from the Hugging Face hub ({err}); offline, "
            f"set data_dir=../shared/data or {DATA_DIR_ENV}"
        ) from err
    text_f, pair_f, label_f = hub.get("text", "text"), hub.get("text_pair"), hub.get("label", "label")
    labels = list(task_cfg.get("labels") or ds.features[label_f].names)
    rows = [
        Example(text=r[text_f], label=int(r[label_f]), text_pair=r[pair_f] if pair_f else None)
        for r in ds
        if int(r[label_f]) >= 0  # hub test splits of GLUE hide their labels as -1
    ]
    return rows, labels
