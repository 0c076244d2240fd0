"""Errors that fedprompt raises on bad input.

Every one of them says what is wrong and how to fix it, and is raised before expensive work (model
loads, training) starts. The CLI prints them without a traceback.
"""


class FedPromptError(ValueError):
    """Base class: a user-facing error about input, configuration or environment."""


class ConfigError(FedPromptError):
    """The composed configuration is invalid (unknown task/model, impossible value)."""


class DataError(FedPromptError):
    """A data folder or a row in it is missing or malformed."""


class ModelError(FedPromptError):
    """A model cannot be resolved or loaded."""
