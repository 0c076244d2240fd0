"""Model registry (embedded + HF ids), soft prompts, prompted label-word scoring."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
