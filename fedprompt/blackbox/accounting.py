"""API keys, per-key usage counters and budgets.

Keys come from a file (one a line: ``<key> [name=<n>] [requests=N] [queries=N] [tokens=N] [admin=true]``,
``#`` starts a comment) and/or an environment variable (keys separated by commas or whitespace). With no
key at all the service is open and everything is counted under ``anonymous``.

Work is *reserved* against a budget when a request is admitted and *settled* with its actual cost when it
finishes (or released when it fails), so concurrent requests cannot overrun a budget together.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from fedprompt.blackbox.base import Usage
from fedprompt.blackbox.errors import AuthError, BudgetExhausted
from fedprompt.blackbox.settings import Budget
from fedprompt.errors import ConfigError

ANONYMOUS = "anonymous"


def _digest(key: str) -> str:
    # Keys are looked up by hash so that the table never holds them in clear and lookups are constant-time.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Account:
    name: str
    budget: Budget
    admin: bool = False
    usage: Usage = field(default_factory=Usage)
    rejected: int = 0  # requests answered with a 4xx after authentication

    def remaining(self) -> dict[str, int | None]:
        used = {"requests": self.usage.requests, "queries": self.usage.queries,
                "tokens": self.usage.prompt_tokens + self.usage.completion_tokens}
        return {k: None if limit is None else max(limit - used[k], 0) for k, limit in asdict(self.budget).items()}

    def report(self) -> dict:
        return {"key": self.name, "usage": {**self.usage.to_dict(), "rejected": self.rejected},
                "budget": asdict(self.budget), "remaining": self.remaining()}


@dataclass(frozen=True)
class KeySpec:
    key: str
    name: str
    budget: Budget | None = None  # None: the server's default budget
    admin: bool = False


def parse_keys_file(path: str | os.PathLike) -> list[KeySpec]:
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read API keys file {path}: {err}") from None
    specs: list[KeySpec] = []
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        key, options = words[0], {}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if not sep or name not in ("name", "requests", "queries", "tokens", "admin"):
                raise ConfigError(f"{path}:{number}: bad field {word!r}; expected name=, requests=, queries=, tokens= or admin=")
            options[name] = value
        try:
            limits = {k: int(options[k]) for k in ("requests", "queries", "tokens") if k in options}
        except ValueError:
            raise ConfigError(f"{path}:{number}: budgets must be integers, got {options}") from None
        specs.append(KeySpec(key, options.get("name") or f"key{len(specs) + 1}", Budget(**limits) if limits else None,
                             options.get("admin", "false").lower() in ("1", "true", "yes")))
    if not specs:
        raise ConfigError(f"API keys file {path} holds no key; add one key a line, or drop service.api_keys_file to serve without keys")
    return specs


def keys_from_env(variable: str) -> list[KeySpec]:
    raw = os.environ.get(variable, "")
    return [KeySpec(k, f"env{i + 1}") for i, k in enumerate(raw.replace(",", " ").split())]


def merge_budget(spec: Budget | None, default: Budget) -> Budget:
    """A key's own budget fields win; the rest come from the default."""
    if spec is None:
        return default
    return replace(default, **{k: v for k, v in asdict(spec).items() if v is not None})


class Accountant:
    """Thread-safe table of accounts: authentication, reservations against budgets, usage reports."""

    def __init__(self, keys: Sequence[KeySpec] = (), default_budget: Budget = Budget()) -> None:
        self._lock = threading.Lock()
        self._by_digest: dict[str, Account] = {}
        names = set()
        for spec in keys:
            if _digest(spec.key) in self._by_digest:
                raise ConfigError(f"API key of {spec.name!r} is listed twice")
            if spec.name in names:
                raise ConfigError(f"two API keys share the name {spec.name!r}; names must be unique")
            names.add(spec.name)
            self._by_digest[_digest(spec.key)] = Account(spec.name, merge_budget(spec.budget, default_budget), spec.admin)
        self.auth_required = bool(self._by_digest)
        self._anonymous = Account(ANONYMOUS, default_budget, admin=True)

    @classmethod
    def from_settings(cls, keys_file: str | None, env_var: str, default_budget: Budget) -> Accountant:
        keys = (parse_keys_file(keys_file) if keys_file else []) + keys_from_env(env_var)
        return cls(keys, default_budget)

    def authenticate(self, authorization: str | None) -> Account:
        """The account of an ``Authorization: Bearer <key>`` header value."""
        if not self.auth_required:
            return self._anonymous
        if not authorization:
            raise AuthError("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError("malformed Authorization header: expected 'Bearer <key>'")
        account = self._by_digest.get(_digest(key.strip()))
        if account is None:
            raise AuthError("invalid API key")
        return account

    def reserve(self, account: Account, cost: Usage) -> Usage:
        """Charge ``cost`` now, or raise :class:`BudgetExhausted` saying which allowance is short."""
        with self._lock:
            budget, used = account.budget, account.usage
            checks = (("requests", budget.requests, used.requests, cost.requests),
                      ("queries", budget.queries, used.queries, cost.queries),
                      ("tokens", budget.tokens, used.prompt_tokens + used.completion_tokens,
                       cost.prompt_tokens + cost.completion_tokens))
            for what, limit, spent, need in checks:
                if limit is not None and spent + need > limit:
                    raise BudgetExhausted(
                        f"budget exhausted for API key {account.name!r}: {what} used {spent} of {limit}, this request "
                        f"needs {need} more; ask the operator for a larger budget (service.budget.{what} or the keys file)"
                    )
            used.add(cost)
            return cost.copy()

    def settle(self, account: Account, reserved: Usage, actual: Usage) -> None:
        """Replace a reservation by the actual cost (completions reserve ``max_tokens``, use fewer)."""
        with self._lock:
            account.usage.add(actual.minus(reserved))

    def release(self, account: Account, reserved: Usage) -> None:
        with self._lock:
            account.usage.add(Usage().minus(reserved))

    def reject(self, account: Account) -> None:
        with self._lock:
            account.rejected += 1

    def report(self, account: Account, everyone: bool = False) -> dict:
        with self._lock:
            report = account.report()
        if everyone:
            report["keys"] = self.reports()
        return report

    def reports(self) -> list[dict]:
        """Every account's report (the anonymous one on an open server)."""
        with self._lock:
            return [a.report() for a in self._by_digest.values()] or [self._anonymous.report()]
