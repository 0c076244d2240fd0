"""What resume needs beside Flower's records (fedprompt.fl.checkpoint keeps those): the sealed file, the
checks of a checkpoint's plain fields, which settings a resume may change, and this process's RNG states.
Flower-free, so the launcher (``fedprompt resume``) and the run report use it without importing Flower.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any, Mapping, cast

import numpy as np

from fedprompt.runs.report import ROW_EXTRA_TYPES, ROW_TYPES
from fedprompt.typed_config import flatten

# Settings a resumed run may change: where and how it is launched, not what it computes.
VOLATILE = ("resume", "progress", "verbose", "output_dir", "federation.round_timeout_s", "federation.superlink_port",
            "service.api_key")  # a key is a launch setting; a run's files only ever hold it as ***


def write_atomic(path: Path, data: bytes) -> None:
    # A stop while writing must leave the previous file whole: write beside it, then rename over it.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# The hash goes inside the file, as its last key, not into a file beside it: the two are then replaced in one
# atomic rename, whereas a stop between two renames (what resume is for) would leave a good checkpoint that
# fails its check. It is computed over the exact bytes before it, so any changed byte is found (a canonical
# re-serialization would miss edits that parse alike, such as 1e-05 -> 1E-05). It detects damage and edits,
# not an adversary: anyone can recompute it, so every field is also checked (_decode).
_SEAL = re.compile(rb', "sha256": "([0-9a-f]{64})"}\Z')


def seal(body: bytes) -> bytes:
    """``body`` (a JSON object's bytes) with its SHA-256 added as the last key."""
    return body[:-1] + b', "sha256": "' + hashlib.sha256(body).hexdigest().encode() + b'"}'


class Damaged(Exception):
    """What is wrong with a checkpoint (Checkpoint.read names the file)."""


def check(ok: bool, problem: str) -> None:
    if not ok:
        raise Damaged(problem)


def typed(value: Any, types: tuple) -> bool:
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))  # JSON true is no count


def short(value: Any) -> str:
    text = repr(value)  # one line: repr escapes newlines
    return text if len(text) <= 60 else text[:57] + "..."


def unseal(raw: bytes) -> Any:
    """The JSON value of a file :func:`seal` wrote, or Damaged: its hash missing, not matching, or over non-JSON."""
    found = _SEAL.search(raw)
    if found is None:
        raise Damaged("no SHA-256 at its end (truncated, or not written by this fedprompt)")
    body = raw[: found.start()] + b"}"
    check(hashlib.sha256(body).hexdigest() == found[1].decode(),
          "its SHA-256 does not match its content (changed after it was written)")
    try:
        return json.loads(body)
    except ValueError as err:  # a matching hash over garbage: written by something else
        raise Damaged(f"not JSON ({err})") from None


def check_rows(rows: Any, last: int) -> None:
    check(isinstance(rows, list) and all(isinstance(r, dict) for r in rows), "rows is not a list of objects")
    numbers = [r.get("round") for r in rows]
    # A cut or reordered list would resume into a report with rounds missing ([0, 3]) or doubled.
    check(numbers == list(range(last + 1)), f"rows are rounds {numbers[:10]}, not 0..{last} in order")
    for number, row in enumerate(rows):
        for key, types in ROW_TYPES.items():
            check(key in row and typed(row[key], types), f"round {number}'s row: {key} is {short(row.get(key))}")
        for key, types in ROW_EXTRA_TYPES.items():
            check(key not in row or typed(row[key], types), f"round {number}'s row: {key} is {short(row.get(key))}")


def check_rng(rng: Any) -> None:
    check(isinstance(rng, dict) and {"python", "numpy"} <= set(rng) <= {"python", "numpy", "torch", "cuda"},
           f"rng holds {short(sorted(rng) if isinstance(rng, dict) else rng)}, not python, numpy (torch, cuda)")
    try:  # set them on fresh generators: their own checks, and this process's RNGs stay as they are
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        # NumPy takes any position; past 624 it would draw from outside its state
        check(typed(pos, (int,)) and 0 <= pos <= 624, f"rng.numpy's position {short(pos)} is not in 0..624")
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        for state in ([rng["torch"]] if "torch" in rng else []) + list(rng.get("cuda", [])):
            check(isinstance(state, str) and bool(base64.b64decode(state, validate=True)), "a torch state is empty")
    except Damaged:
        raise
    except Exception as err:  # noqa: BLE001 - each generator raises its own kind
        raise Damaged(f"rng states are malformed ({type(err).__name__}: {err})") from None


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every setting (but :data:`VOLATILE`) that differs."""
    a, b = flatten(saved), flatten(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(VOLATILE))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


# --- RNG states of this process: whatever global generator a method's server draws from ------------------------


def rng_state() -> dict[str, Any]:
    # the legacy tuple, get_state()'s default (numpy's stub types its default call as the dict form)
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    torch = sys.modules.get("torch")  # only if the method uses torch: never import it for this
    if torch is not None:
        state["torch"] = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        import torch

        def tensor(b64: str):
            return torch.from_numpy(np.frombuffer(base64.b64decode(b64), dtype=np.uint8).copy())

        torch.set_rng_state(tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
