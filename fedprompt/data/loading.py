"""Loading task splits: a local folder in the shared format, or the Hugging Face hub.

A task folder holds ``{train,validation,test}.jsonl`` (one ``{"text", ["text_pair"], "label"}`` object a
line) and ``meta.json`` (``{"labels": [...], ...}``). The folder comes from ``task.path``, else
``<data_dir>/<task>``, else ``$FEDPROMPT_DATA_DIR/<task>``; with none of those set, the task's Hugging
Face dataset id (``task.hf``) is used, for users who have the hub.

On the hub, ``task.hf.splits`` maps each of our splits to its own hub split, never one to another's
(validation scored on test rows is test data in a choice). A dataset without a validation split says
``validation: carve``: validation is then a seeded draw from the hub's train split and our train is the
rest, as ../shared/data carved it (10% of train, seed 13, at most 1000 rows; ``task.hf.validation_size``
overrides the count). GLUE hides test labels, so RTE maps ``test: validation`` and carves its validation.
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fedprompt.data.task import Example
from fedprompt.errors import ConfigError, DataError

DATA_DIR_ENV = "FEDPROMPT_DATA_DIR"
SPLITS = ("train", "validation", "test")
CARVE = "carve"  # task.hf.splits.validation: draw validation from the hub's train split
# How ../shared/data carved its validation sets (meta.json: "10% of train, seed 13"; TREC 545, RTE 249 rows;
# AG News 1000 of a 10k train subset, hence the cap on the hub's 120k-row train split).
CARVE_SEED, CARVE_FRACTION, CARVE_MAX = 13, 0.1, 1000


def check_task_name(name: Any) -> None:
    """A task name is one folder name: ``task=../x`` or ``task=a/b`` would read (and name run folders)
    outside the data folder."""
    text = str(name)
    if text in ("", ".", "..") or any(sep in text for sep in "/\\"):
        raise ConfigError(f"task={text!r} is not a plain folder name: task=<name> reads <data_dir>/<name>; for a "
                          f"folder elsewhere use task=<name> task.path=<folder>")


def resolve_task_dir(task_cfg: Mapping[str, Any], data_dir: str | os.PathLike | None) -> Path | None:
    """The local folder of a task, or ``None`` when the hub should be used.

    Raises :class:`DataError` when a folder was asked for (config or environment) but is missing, so
    a typo never silently falls back to a download.
    """
    check_task_name(task_cfg["name"])
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
        meta = json.loads(_read_text(meta_path, "meta.json must be UTF-8 JSON"))
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
    text = _read_text(path, "split files must be UTF-8 JSON Lines, one JSON object a line")
    for line_no, line in enumerate(io.StringIO(text, newline=None), start=1):  # newlines as open() reads them
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


def _read_text(path: Path, expected: str) -> str:
    """A data file as text; bytes that are not UTF-8 (a binary or Latin-1 file) name the line they are on."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {data[err.start]:#04x}); {expected}") from None


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


def hub_splits(hub: Mapping[str, Any]) -> dict[str, str]:
    """Our split -> its hub split (or :data:`CARVE`), from ``task.hf.splits`` (unnamed splits keep their name).

    Raises :class:`DataError` when two of our splits would read the same hub split: a validation that is
    the test set picks prompts and checkpoints on test data, and a test equal to train scores memory.
    """
    given = {str(k): v for k, v in (hub.get("splits") or {}).items()}
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise DataError(f"task.hf.splits: unknown split(s) {unknown}; its keys are {list(SPLITS)}")
    plan = {ours: str(given.get(ours) or ours) for ours in SPLITS}
    if CARVE in (plan["train"], plan["test"]):
        raise DataError(
            f"task.hf.splits: only validation can be {CARVE!r} (drawn from hub train); map train and test to hub splits"
        )
    seen: dict[str, str] = {}
    for ours, theirs in plan.items():
        if theirs in seen:
            raise DataError(
                f"task.hf.splits maps both {seen[theirs]!r} and {ours!r} to hub split {theirs!r}; give each its own "
                f"hub split, or set validation: {CARVE} to carve validation from hub train"
            )
        if theirs != CARVE:
            seen[theirs] = ours
    return plan


def carve(
    rows: Sequence[Example], size: int | None = None, seed: int = CARVE_SEED
) -> tuple[list[Example], list[Example]]:
    """``(rest, carved)``: ``size`` rows (default 10%, at most 1000) drawn with a fixed seed, apart from the rest.

    Depends only on the row count and the seed, so train and validation, each carved from the same hub
    train split, are always complementary; both keep the hub's row order.
    """
    n = len(rows)
    size = min(CARVE_MAX, int(CARVE_FRACTION * n)) if size is None else int(size)
    if not 0 < size < n:
        raise DataError(
            f"cannot carve {size} validation rows from a train split of {n}; set task.hf.validation_size to 1..{n - 1}"
        )
    held = set(np.random.default_rng(seed).permutation(n)[:size].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


@functools.lru_cache(maxsize=8)
def _hub_rows(
    path: str, name: str | None, split: str, text_f: str, pair_f: str | None, label_f: str
) -> tuple[tuple[Example, ...], tuple[str, ...]]:
    """One hub split's labelled rows and label names, loaded once a process: train and the validation
    carved from it come from the same load, so they cannot drift apart."""
    import datasets  # lazy: only users of the hub pay for it

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # network, missing dataset: say what to do instead
        raise DataError(
            f"could not load {path!r} split {split!r} from the Hugging Face hub ({err}); offline, "
            f"set data_dir=../shared/data or {DATA_DIR_ENV}"
        ) from err
    rows = tuple(
        Example(text=r[text_f], label=int(r[label_f]), text_pair=r[pair_f] if pair_f else None)
        for r in ds
        if int(r[label_f]) >= 0  # hub test splits of GLUE hide their labels as -1
    )
    return rows, tuple(getattr(ds.features[label_f], "names", None) or ())


def load_hub_split(task_cfg: Mapping[str, Any], split: str) -> tuple[list[Example], list[str]]:
    """The same task from the Hugging Face hub (``task.hf``: path, name, fields, split mapping)."""
    hub = task_cfg.get("hf")
    if not hub:
        raise DataError(
            f"task {task_cfg.get('name')!r} has no local folder and no Hugging Face dataset (task.hf); set "
            f"data_dir=<folder with one sub-folder per task> or export {DATA_DIR_ENV}=../shared/data"
        )
    plan = hub_splits(hub)  # before any download: an aliased mapping never loads
    carving = plan["validation"] == CARVE
    source = plan["train"] if split == "validation" and carving else plan[split]
    fields = (hub.get("text") or "text", hub.get("text_pair") or None, hub.get("label") or "label")
    rows, names = _hub_rows(str(hub["path"]), hub.get("name"), source, *fields)
    labels = list(task_cfg.get("labels") or names)
    if carving and split != "test":
        rest, held = carve(rows, hub.get("validation_size"))
        return (held if split == "validation" else rest), labels
    return list(rows), labels
