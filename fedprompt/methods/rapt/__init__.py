"""RAPT (Li, Tan, Liu 2023): users privatize their text locally (d_chi, ``fedprompt.privacy.dchi``) with
random public plain tokens in front; the service trains a soft prompt on it jointly with a head that reconstructs
the plain tokens, and drops the head afterwards. Plain Python; the Flower apps (``fedprompt.fl.rapt``) wrap it."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "PromptConfig": "fedprompt.methods.rapt.config",
    "RAPTConfig": "fedprompt.methods.rapt.config",
    "ReconstructionConfig": "fedprompt.methods.rapt.config",
    "TrainConfig": "fedprompt.methods.rapt.config",
    "PrivateExample": "fedprompt.methods.rapt.inputs",
    "SlotEncoder": "fedprompt.methods.rapt.inputs",
    "privatize_examples": "fedprompt.methods.rapt.inputs",
    "text_ids": "fedprompt.methods.rapt.inputs",
    "RAPTTrainer": "fedprompt.methods.rapt.train",
    "ReconstructionHead": "fedprompt.methods.rapt.train",
    "first_label_tokens": "fedprompt.methods.rapt.train",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
