"""The black-box LLM service: interface, in-process/HTTP/OpenAI-compatible clients, server, accounting.

Methods call ``make_blackbox(cfg)`` and then ``bb.classify(texts, labels, labels_only=...)``; ``bb.usage``
is the cumulative cost. The client classes and the server are imported on first use (they pull in
torch, httpx or fastapi).
"""

from importlib import import_module

from fedprompt.blackbox.base import BlackBoxLM, ClassifyResult, PromptSpace, SoftPromptBlackBox, Usage
from fedprompt.blackbox.errors import BlackBoxError, BudgetExhausted, PayloadTooLarge, ServiceUnavailable
from fedprompt.blackbox.factory import make_blackbox
from fedprompt.blackbox.settings import Budget, ClientSettings, Limits, ServerSettings

_LAZY = {
    "InProcessBlackBox": "fedprompt.blackbox.inprocess",
    "HttpBlackBox": "fedprompt.blackbox.http_client",
    "OpenAICompatibleBlackBox": "fedprompt.blackbox.openai_client",
    "ScoringEngine": "fedprompt.blackbox.engine",
    "create_app": "fedprompt.blackbox.server",
    "RunningServer": "fedprompt.blackbox.runner",
    "Accountant": "fedprompt.blackbox.accounting",
}

__all__ = ["BlackBoxError", "BlackBoxLM", "Budget", "BudgetExhausted", "ClassifyResult", "ClientSettings", "Limits",
           "PayloadTooLarge", "PromptSpace", "ServerSettings", "ServiceUnavailable", "SoftPromptBlackBox", "Usage",
           "make_blackbox", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedprompt.blackbox' has no attribute {name!r}")
