"""A classification task: its labels, its prompt template and its verbalizer (label words)."""

from __future__ import annotations

import string
from dataclasses import dataclass, replace
from typing import Any, Mapping

from fedprompt.errors import ConfigError


@dataclass(frozen=True)
class Example:
    """One labelled row of a task (``text_pair`` only for pair tasks such as RTE)."""

    text: str
    label: int
    text_pair: str | None = None


_ALLOWED_FIELDS = {"prompt", "text", "text_pair"}


@dataclass(frozen=True)
class TaskSpec:
    """How a task is shown to a causal LM.

    ``template`` is the user's message, a ``str.format`` string with the fields ``{prompt}`` (the
    instruction or searched discrete prompt), ``{text}`` and, for pair tasks, ``{text_pair}``;
    ``answer_prefix`` opens the answer (e.g. ``"Sentiment:"``). ``chat_format`` comes from the model: it
    places the two (``{user}``, ``{answer}``), e.g. in an instruct model's chat markup. The model is
    scored on the label words right after the whole string. ``manual_prompt`` is the plain human
    instruction of the task, fixed before any search or tuning and reported beside every tuned result.
    """

    name: str
    labels: tuple[str, ...]
    label_words: tuple[str, ...]
    template: str
    manual_prompt: str
    answer_prefix: str = "Answer:"
    chat_format: str = "{user}\n{answer}"
    is_pair: bool = False

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ConfigError(f"task {self.name!r}: needs at least 2 labels, got {list(self.labels)}")
        if len(self.label_words) != len(self.labels):
            raise ConfigError(
                f"task {self.name!r}: {len(self.label_words)} label words for {len(self.labels)} labels "
                f"{list(self.labels)}; give one label word per label (task.label_words=[...])"
            )
        if len(set(self.label_words)) != len(self.label_words):
            raise ConfigError(f"task {self.name!r}: label words must be distinct, got {list(self.label_words)}")
        for word in self.label_words:
            if not word or not word.strip():
                raise ConfigError(
                    f"task {self.name!r}: label word {word!r} is empty; every label word needs visible text "
                    "(e.g. ' positive')"
                )
        fields = set(_fields(self.template))
        unknown = fields - _ALLOWED_FIELDS
        if unknown:
            raise ConfigError(
                f"task {self.name!r}: template has unknown fields {sorted(unknown)}; allowed: "
                f"{sorted(_ALLOWED_FIELDS)}"
            )
        if "text" not in fields:
            raise ConfigError(f"task {self.name!r}: template must contain {{text}}, got {self.template!r}")
        if set(_fields(self.chat_format)) != {"user", "answer"}:
            raise ConfigError(f"model chat_format must contain exactly {{user}} and {{answer}}, got {self.chat_format!r}")
        if self.is_pair and "text_pair" not in fields:
            raise ConfigError(f"task {self.name!r} is a pair task: its template must contain {{text_pair}}")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def format(self, example: Example, prompt: str | None = None) -> str:
        """The model input for one example; ``prompt`` defaults to the manual prompt."""
        prompt = self.manual_prompt if prompt is None else prompt
        user = self.template.format(prompt=prompt, text=example.text, text_pair=example.text_pair or "")
        return self.chat_format.format(user=user, answer=self.answer_prefix)

    def with_chat_format(self, chat_format: str | None) -> TaskSpec:
        return self if not chat_format else replace(self, chat_format=chat_format)


def _fields(fmt: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None]


def task_from_config(task_cfg: Mapping[str, Any], labels: list[str] | None = None) -> TaskSpec:
    """Build a :class:`TaskSpec` from a ``task`` config node; ``labels`` (from meta.json) win if given."""
    names = list(labels if labels is not None else (task_cfg.get("labels") or []))
    if not names:
        raise ConfigError(
            f"task {task_cfg.get('name')!r}: no label names: put them in the data folder's meta.json "
            "('labels': [...]) or in task.labels"
        )
    words = task_cfg.get("label_words")
    if not words:
        words = [" " + name for name in names]  # a sensible default verbalizer: the label names
    return TaskSpec(
        name=str(task_cfg["name"]),
        labels=tuple(names),
        label_words=tuple(str(w) for w in words),
        template=str(task_cfg.get("template") or "{prompt}\n\n{text}"),
        manual_prompt=str(task_cfg.get("manual_prompt") or "").replace("{labels}", ", ".join(names)),
        answer_prefix=str(task_cfg.get("answer_prefix") or "Answer:"),
        is_pair=bool(task_cfg.get("is_pair", False)),
    )
