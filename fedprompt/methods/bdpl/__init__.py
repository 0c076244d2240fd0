"""BDPL (Diao et al., TMLR 2023): black-box discrete prompt learning with a variance-reduced policy
gradient over per-slot categorical distributions; federated as FedOne (Wang et al. 2025: one activated
client per round) or with K clients per round (FedAvg of the logits). Plain Python; the Flower apps
(``fedprompt.fl.bdpl``) wrap it."""

from __future__ import annotations

from fedprompt.lazy import lazy_exports

# name -> the submodule that defines it; imported on first use (PEP 562), so that importing one submodule
# (e.g. the torch-free config, for composing a config) does not import the others.
_EXPORTS = {
    "BDPLConfig": "fedprompt.methods.bdpl.config",
    "Adam": "fedprompt.methods.bdpl.policy",
    "SGD": "fedprompt.methods.bdpl.policy",
    "argmax_prompt": "fedprompt.methods.bdpl.policy",
    "entropy": "fedprompt.methods.bdpl.policy",
    "log_prob": "fedprompt.methods.bdpl.policy",
    "policy_gradient_step": "fedprompt.methods.bdpl.policy",
    "sample": "fedprompt.methods.bdpl.policy",
    "score_function": "fedprompt.methods.bdpl.policy",
    "softmax": "fedprompt.methods.bdpl.policy",
    "variance_reduced_gradient": "fedprompt.methods.bdpl.policy",
    "BDPLClient": "fedprompt.methods.bdpl.search",
    "BDPLResult": "fedprompt.methods.bdpl.search",
    "candidate_vocab": "fedprompt.methods.bdpl.search",
    "label_losses": "fedprompt.methods.bdpl.search",
    "prompt_text": "fedprompt.methods.bdpl.search",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
