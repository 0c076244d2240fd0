"""Model registry (embedded + HF ids), soft prompts, prompted label-word scoring."""

from fedprompt.models.classifier import EvalResult, PromptedClassifier
from fedprompt.models.registry import EMBEDDED, check_model_name, load_causal_lm, load_tokenizer, materialize
from fedprompt.models.scoring import calibrate_mean, encode_label_words, pick_labels, score_label_words
from fedprompt.models.soft_prompt import SoftPrompt

__all__ = [
    "EMBEDDED",
    "EvalResult",
    "PromptedClassifier",
    "SoftPrompt",
    "calibrate_mean",
    "check_model_name",
    "encode_label_words",
    "load_causal_lm",
    "load_tokenizer",
    "materialize",
    "pick_labels",
    "score_label_words",
]
