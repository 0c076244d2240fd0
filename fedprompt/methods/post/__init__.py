"""POST (Wang et al., ICML 2025): soft-prompt tuning on a distilled student (optionally with DP-SGD),
FedAvg of the clients' prompts, and the transfer of the global prompt to the large model. Plain Python;
the Flower apps (``fedprompt.fl.post``) wrap it. The student itself is built in ``fedprompt.models.distill``."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "POSTConfig": "fedprompt.methods.post.config",
    "TransferConfig": "fedprompt.methods.post.config",
    "PromptConfig": "fedprompt.methods.post.config",
    "initial_prompt": "fedprompt.methods.post.prompts",
    "load_prompt": "fedprompt.methods.post.prompts",
    "save_prompt": "fedprompt.methods.post.prompts",
    "PromptTransfer": "fedprompt.methods.post.transfer",
    "TransferResult": "fedprompt.methods.post.transfer",
    "alpha_rule": "fedprompt.methods.post.transfer",
    "SoftPromptTuner": "fedprompt.methods.post.tuning",
    "TrainConfig": "fedprompt.methods.post.config",
    "TrainResult": "fedprompt.methods.post.tuning",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
