"""``status.json`` in a run folder: what became of the run.

    {"state": "running", "pid": <launcher>, "resumed_from_round": r | null, "at": ...}
    {"state": "completed", "round": n, "num_rounds": n, "at": ...}
    {"state": "interrupted", "round": r, "num_rounds": n, "by": "SIGTERM", "message": "interrupted at round r
     of n by SIGTERM; every process of the run is stopped; continue with `fedprompt resume <folder>`", "at": ...}
    {"state": "failed", "error": "...", "at": ...}

``round`` is the last round the checkpoint holds, where ``fedprompt resume`` continues. The launcher writes
every state; if it dies, its watchdog writes "interrupted" (fedprompt.commands.tree). A folder left at "running"
with no such process alive was stopped in a way neither could see (the machine went down).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS = "status.json"


def read_status(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / STATUS).read_text())
    except (OSError, ValueError):
        return None


def write_status(folder: Path, state: str, **facts: Any) -> dict[str, Any]:
    status = {"state": state, **facts, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(folder) / STATUS
    tmp = path.with_name(path.name + ".tmp")  # a stop while writing leaves the previous status whole
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, path)
    return status


def checkpoint_round(folder: Path) -> tuple[int | None, int | None]:
    """(round, num_rounds) of the folder's checkpoint, (None, None) without one. Read, not checked: a resume
    checks it (fedprompt.fl.checkpoint), and the watchdog that calls this must not import Flower."""
    try:
        data = json.loads((Path(folder) / "checkpoint.json").read_bytes())
        return data.get("round"), data.get("num_rounds")
    except (OSError, ValueError, AttributeError):
        return None, None


def mark_interrupted(folder: Path, by: str) -> dict[str, Any]:
    """Record a stop while the run was running; an end already recorded (by the launcher) is kept."""
    current = read_status(folder)
    if current is not None and current.get("state") != "running":
        return current
    done, total = checkpoint_round(folder)
    where = "before round 0 was done" if done is None else f"at round {done} of {total}"
    message = (f"interrupted {where} by {by}; every process of the run is stopped; "
               f"continue with `fedprompt resume {Path(folder)}`")
    return write_status(folder, "interrupted", round=done, num_rounds=total, by=by, message=message)
