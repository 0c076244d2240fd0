"""Helpers for the black-box tests: a real server on 127.0.0.1 (free port) around a loaded model."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from fedprompt.blackbox.runner import RunningServer
from fedprompt.blackbox.server import create_app
from fedprompt.blackbox.settings import Limits, ServerSettings

TEXTS = ["a great movie with a wonderful cast", "a terrible film , boring and too long", "who wrote hamlet ?",
         "stocks fell as oil prices rose", "the team won the championship game", "new phone released today",
         "what is the capital of france ?", "a great movie"]
KEYS = {"alice": "sk-alice-0123", "bob": "sk-bob-4567", "root": "sk-root-89ab"}


def write_keys(folder: Path) -> Path:
    path = folder / "keys.txt"
    path.write_text(f"# test keys\n{KEYS['alice']} name=alice\n{KEYS['bob']} name=bob queries=5\n"
                    f"{KEYS['root']} name=root admin=true\n")
    return path


@contextmanager
def serving(model, tokenizer, keys_file: Path | None = None, limits: Limits = Limits(), **settings):
    """A running server; yields it (``.url``) and stops it afterwards."""
    options = dict(model_id="tiny", api_keys_file=str(keys_file) if keys_file else None, limits=limits,
                   api_keys_env="FEDPROMPT_TEST_NO_KEYS")
    app = create_app(model, ServerSettings(**{**options, **settings}), tokenizer=tokenizer)
    with RunningServer(app) as server:
        server.app = app
        yield server


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}
