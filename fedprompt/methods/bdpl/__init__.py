"""BDPL (Diao et al., TMLR 2023): black-box discrete prompt learning with a variance-reduced policy
gradient over per-slot categorical distributions; federated as FedOne (Wang et al. 2025: one activated
client per round) or with K clients per round (FedAvg of the logits). Plain Python; the Flower apps
(``fedprompt.fl.bdpl``) wrap it."""

from fedprompt.methods.bdpl.config import BDPLConfig
from fedprompt.methods.bdpl.policy import (
    SGD,
    Adam,
    argmax_prompt,
    entropy,
    log_prob,
    policy_gradient_step,
    sample,
    score_function,
    softmax,
    variance_reduced_gradient,
)
from fedprompt.methods.bdpl.search import BDPLClient, BDPLResult, candidate_vocab, label_losses, prompt_text

__all__ = [
    "Adam",
    "BDPLClient",
    "BDPLConfig",
    "BDPLResult",
    "SGD",
    "argmax_prompt",
    "candidate_vocab",
    "entropy",
    "label_losses",
    "log_prob",
    "policy_gradient_step",
    "prompt_text",
    "sample",
    "score_function",
    "softmax",
    "variance_reduced_gradient",
]
