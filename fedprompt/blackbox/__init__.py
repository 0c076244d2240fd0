"""The black-box LLM service: interface, in-process/HTTP/OpenAI-compatible clients, server, accounting."""

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, Usage

__all__ = ["BlackBoxLM", "ClassifyResult", "Usage"]
