"""Test hook, kept out of fedprompt: tests/test_resume.py puts this folder on the PYTHONPATH of a `fedprompt run`
it stops, with FEDPROMPT_TEST_PAUSE_AFTER_ROUND=<round>. Python imports sitecustomize at the start of every
process of that run (launcher, SuperLink, ServerApp), and the server then waits after checkpointing that round,
where a stop between rounds finds a run, so the test can stop it there for certain."""

import os

PAUSE_ENV = "FEDPROMPT_TEST_PAUSE_AFTER_ROUND"

if os.environ.get(PAUSE_ENV):  # only the stopped run's processes pay for importing Flower here
    import time

    from fedprompt.fl.checkpoint import Checkpoint

    _write = Checkpoint.write

    def _write_then_pause(self, folder):
        _write(self, folder)
        if str(self.round) == os.environ[PAUSE_ENV]:
            time.sleep(600)

    Checkpoint.write = _write_then_pause
