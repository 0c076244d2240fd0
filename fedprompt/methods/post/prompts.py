"""Soft prompts as files (safetensors, with a little metadata) and their text initialisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedprompt.data.task import TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.methods.post.config import PromptConfig
from fedprompt.models.soft_prompt import SoftPrompt

WEIGHT = "prompt"


def initial_prompt(config: PromptConfig, spec: TaskSpec, tokenizer, model) -> SoftPrompt:
    """The text-initialised prompt: the embeddings of ``init_text`` (default: the manual prompt), repeated."""
    text = config.init_text or spec.manual_prompt
    if not text.strip():
        raise ConfigError(f"task {spec.name!r} has no manual prompt to initialise the soft prompt from; "
                          "set method.prompt.init_text")
    return SoftPrompt.from_text(text, tokenizer, model.get_input_embeddings(), config.num_tokens)


def save_prompt(prompt: SoftPrompt, path: str | Path, **meta: Any) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({WEIGHT: prompt.weight.detach().float().cpu().contiguous()}, str(path),
              metadata={"fedprompt": json.dumps(meta, default=str)})
    return path


def load_prompt(path: str | Path) -> tuple[SoftPrompt, dict]:
    """A prompt saved by :func:`save_prompt` (e.g. ``prompt.safetensors`` of a ``method=post`` run) and its metadata."""
    from safetensors import safe_open

    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"soft prompt file {str(path)!r} does not exist; pass the prompt.safetensors that "
                          "`fedprompt run method=post` wrote into its run folder")
    try:
        with safe_open(str(path), framework="pt") as handle:
            weight = handle.get_tensor(WEIGHT)
            meta = json.loads((handle.metadata() or {}).get("fedprompt", "{}"))
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(f"{path} is not a fedprompt soft prompt file ({err})") from None
    if weight.ndim != 2:
        raise ConfigError(f"{path}: a soft prompt is a (tokens, hidden) matrix, got shape {tuple(weight.shape)}")
    return SoftPrompt(weight.shape[0], weight.shape[1], weight), meta
