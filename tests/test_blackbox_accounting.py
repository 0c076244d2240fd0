"""API keys, budgets and reservations; settings validation."""

from __future__ import annotations

import threading

import pytest

from fedprompt.blackbox import Budget, BudgetExhausted, ClientSettings, Limits, ServerSettings, Usage
from fedprompt.blackbox.accounting import Accountant, keys_from_env, parse_keys_file
from fedprompt.blackbox.errors import AuthError
from fedprompt.errors import ConfigError


def test_keys_file_names_budgets_and_admins(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# comment\n\nk1 name=alice queries=10  # trailing\nk2 tokens=500 admin=true\n")
    alice, second = parse_keys_file(path)
    assert (alice.key, alice.name, alice.budget, alice.admin) == ("k1", "alice", Budget(queries=10), False)
    assert (second.name, second.budget, second.admin) == ("key2", Budget(tokens=500), True)
    accountant = Accountant([alice, second], default_budget=Budget(requests=100, queries=50))
    account = accountant.authenticate("Bearer k1")
    assert account.budget == Budget(requests=100, queries=10)  # own field wins, the rest from the default


@pytest.mark.parametrize("text, words", [
    ("k1 color=blue\n", "keys:1: bad field 'color=blue'"),
    ("k1 queries=many\n", "keys:1: budgets must be integers"),
    ("# nothing\n", "holds no key"),
    ("k1\nk1\n", "listed twice"),
    ("k1 name=a\nk2 name=a\n", "share the name 'a'"),
])
def test_bad_keys_files_are_reported_with_their_line(tmp_path, text, words):
    path = tmp_path / "keys"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        Accountant(parse_keys_file(path))


def test_keys_from_env(monkeypatch):
    monkeypatch.setenv("MY_KEYS", "a, b  c")
    specs = keys_from_env("MY_KEYS")
    assert [s.key for s in specs] == ["a", "b", "c"]
    accountant = Accountant(specs)
    assert accountant.authenticate("Bearer c").name == "env3"
    for header, words in ((None, "missing"), ("Bearer zzz", "invalid"), ("Token c", "malformed")):
        with pytest.raises(AuthError, match=words):
            accountant.authenticate(header)


def test_open_server_counts_everything_as_anonymous():
    accountant = Accountant([])
    assert not accountant.auth_required and accountant.authenticate(None).name == "anonymous"


def test_reserve_settle_release():
    accountant = Accountant([], Budget(tokens=100))
    account = accountant.authenticate(None)
    held = accountant.reserve(account, Usage(requests=1, queries=2, prompt_tokens=40, completion_tokens=50))
    with pytest.raises(BudgetExhausted, match=r"tokens used 90 of 100, this request needs 20"):
        accountant.reserve(account, Usage(prompt_tokens=20))
    accountant.settle(account, held, Usage(requests=1, queries=2, prompt_tokens=40, completion_tokens=5, bytes_sent=7))
    assert account.remaining()["tokens"] == 55 and account.usage.bytes_sent == 7
    held = accountant.reserve(account, Usage(prompt_tokens=50))
    accountant.release(account, held)
    assert account.usage.prompt_tokens == 40


def test_concurrent_reservations_never_overrun_a_budget():
    accountant = Accountant([], Budget(queries=50))
    account = accountant.authenticate(None)
    granted = []

    def grab() -> None:
        for _ in range(20):
            try:
                accountant.reserve(account, Usage(queries=1))
                granted.append(1)
            except BudgetExhausted:
                pass

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 50 and account.usage.queries == 50


@pytest.mark.parametrize("make, words", [
    (lambda: Limits(max_batch=0), "service.limits.max_batch"),
    (lambda: Limits(max_logprobs=21), "at most 20"),
    (lambda: ServerSettings(port=70000), "service.port"),
    (lambda: ServerSettings(api_keys_file="/no/such/file"), "does not exist"),
    (lambda: ServerSettings(wait_ms=-1), "wait_ms"),
    (lambda: ClientSettings(kind="pigeon"), "service.kind"),
    (lambda: ClientSettings(retries=-1), "retries"),
    (lambda: ClientSettings(top_logprobs=50), "top_logprobs"),
    (lambda: Budget(queries=-5), "queries must be a non-negative integer"),
])
def test_settings_are_validated(make, words):
    with pytest.raises(ConfigError, match=words):
        make()
