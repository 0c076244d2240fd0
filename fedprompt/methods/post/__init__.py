"""POST (Wang et al., ICML 2025): soft-prompt tuning on a distilled student (optionally with DP-SGD),
FedAvg of the clients' prompts, and the transfer of the global prompt to the large model. Plain Python;
the Flower apps (``fedprompt.fl.post``) wrap it. The student itself is built in ``fedprompt.models.distill``."""

from fedprompt.methods.post.config import POSTConfig, TransferConfig
from fedprompt.methods.post.prompts import PromptConfig, initial_prompt, load_prompt, save_prompt
from fedprompt.methods.post.transfer import PromptTransfer, TransferResult, alpha_rule
from fedprompt.methods.post.tuning import SoftPromptTuner, TrainConfig, TrainResult

__all__ = [
    "POSTConfig",
    "PromptConfig",
    "PromptTransfer",
    "SoftPromptTuner",
    "TrainConfig",
    "TrainResult",
    "TransferConfig",
    "TransferResult",
    "alpha_rule",
    "initial_prompt",
    "load_prompt",
    "save_prompt",
]
