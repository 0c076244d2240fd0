"""A quick version of benchmarks/blackbox_fuzz.py: a few hundred random, malformed and hostile requests against
a real server with keys and small limits; no answer may be 5xx and the server must still answer /health."""

from __future__ import annotations

import sys
from pathlib import Path

from fedprompt.blackbox import Limits
from fedprompt.models import load_causal_lm, load_tokenizer
from tests.blackbox_support import serving

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from blackbox_fuzz import KEYS_FILE, LIMITS, run_fuzz  # noqa: E402


def test_fuzz_gets_no_5xx_and_the_server_survives(tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS_FILE)
    model, tok = load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))
    with serving(model, tok, keys, Limits(**LIMITS)) as server:
        result = run_fuzz(server.url, n_requests=300, seed=1, workers=4, max_seconds=120)
    assert result["five_xx"] == 0, result["five_xx_examples"]
    assert result["alive"]
    statuses = result["statuses"]
    # The fuzz reaches every kind of answer, or it tests less than it claims.
    for status in ("200", "400", "401", "404", "413", "422"):
        assert statuses.get(status, 0) > 0, statuses
    assert result["requests"] == 300
    # ... and every kind of abuse (issue 25): slow bodies and heads get 408, strangers' uploads 401 unread
    kinds = result["by_kind"]
    assert set(kinds["slow-body"]) == {"408"} and set(kinds["slow-head"]) == {"408"}, kinds
    assert set(kinds["big-unauthenticated"]) <= {"401", "none"} and "echo" in kinds and "client-timeout" in kinds
