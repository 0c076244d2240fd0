"""Baselines in the same harness: manual prompt and zero-shot evaluation."""

from fedprompt.methods.baselines.manual import evaluate_prompt

__all__ = ["evaluate_prompt"]
