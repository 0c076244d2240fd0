"""Errors that fedprompt raises on bad input.

Every one of them says what is wrong and how to fix it, and is raised before expensive work (model
loads, training) starts. The CLI prints them without a traceback. :class:`Interrupted` is no error: a signal
that stopped a command, printed in one line too.
"""

import signal


class FedPromptError(ValueError):
    """Base class: a user-facing error about input, configuration or environment."""


class ConfigError(FedPromptError):
    """The composed configuration is invalid (unknown task/model, impossible value)."""

    complete = False  # True once its message names the full key (fedprompt.typed_config.from_node)


class DataError(FedPromptError):
    """A data folder or a row in it is missing or malformed."""


class ModelError(FedPromptError):
    """A model cannot be resolved or loaded."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped a command. A KeyboardInterrupt, so that nothing that handles errors (a
    sweep going on to its next job) carries on; the CLI prints it in one line and exits with 128 + the signal."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        super().__init__(message or f"stopped by {self.name}")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal killed
