"""Model registry (embedded + HF ids), soft prompts, prompted label-word scoring."""

from __future__ import annotations

from importlib import import_module

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "EvalResult": "fedprompt.models.classifier",
    "PromptedClassifier": "fedprompt.models.classifier",
    "EMBEDDED": "fedprompt.models.registry",
    "check_model_name": "fedprompt.models.registry",
    "load_causal_lm": "fedprompt.models.registry",
    "load_tokenizer": "fedprompt.models.registry",
    "materialize": "fedprompt.models.registry",
    "calibrate_mean": "fedprompt.models.scoring",
    "encode_label_words": "fedprompt.models.scoring",
    "pick_labels": "fedprompt.models.scoring",
    "score_label_words": "fedprompt.models.scoring",
    "SoftPrompt": "fedprompt.models.soft_prompt",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
