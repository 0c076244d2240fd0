"""Which text a student was distilled on, and the refusal of a student distilled on the run's own clients' text."""

from __future__ import annotations

import json
from pathlib import Path


def student_distill_data(student: str) -> tuple[list[str], str | None, str]:
    """The tasks and split a student was distilled on, from its config.json (``fedprompt_student.distill_data``)
    or its distill_report.json, and which file said so; ([], None, "") for a model with neither."""
    folder = Path(student)
    config = folder / "config.json"
    if config.is_file():
        data = (json.loads(config.read_text()).get("fedprompt_student") or {}).get("distill_data")
        if data:
            return list(data.get("tasks") or []), data.get("split"), str(config)
    report = folder / "distill_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        return list(data.get("data_tasks") or []), data.get("data_split"), str(report)
    return [], None, ""


def check_student_not_distilled_on(task: str, student: str) -> None:
    """Refuse (one line, before any model loads) a student distilled on ``task``'s train split: the clients'
    private training text of this run."""
    from fedprompt.errors import DataError
    from fedprompt.models.distill import DistillDataConfig

    tasks, split, source = student_distill_data(student)
    if task in tasks and split == "train":
        others = DistillDataConfig(tasks=tasks).other_tasks(task)
        raise DataError(f"the student at {student} was distilled on {task}'s train split, the clients' training text of "
                        f"this run (distill data {tasks} {split}, in {source}); distil a student on other tasks: "
                        f"fedprompt distill task={task} distill.data.tasks=[{','.join(others)}] distill.output=<folder>, "
                        f"then method.model=<folder>")
