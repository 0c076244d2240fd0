"""RAPT (Li, Tan, Liu 2023): users privatize their text locally (d_chi, ``fedprompt.privacy.dchi``) with
random public plain tokens in front; the service trains a soft prompt on it jointly with a head that reconstructs
the plain tokens, and drops the head afterwards. Plain Python; the Flower apps (``fedprompt.fl.rapt``) wrap it."""

from fedprompt.methods.rapt.config import PromptConfig, RAPTConfig, ReconstructionConfig, TrainConfig
from fedprompt.methods.rapt.inputs import PrivateExample, SlotEncoder, privatize_examples, text_ids
from fedprompt.methods.rapt.train import RAPTTrainer, ReconstructionHead, first_label_tokens

__all__ = [
    "PrivateExample",
    "PromptConfig",
    "RAPTConfig",
    "RAPTTrainer",
    "ReconstructionConfig",
    "ReconstructionHead",
    "SlotEncoder",
    "TrainConfig",
    "first_label_tokens",
    "privatize_examples",
    "text_ids",
]
