"""A RAPT user's side, without Flower: which examples go out in which round, and privatizing them with the
run's settings. The Flower client (``fedprompt.fl.rapt``) calls :meth:`RAPTUser.send` and encodes
the result; the server privatizes its evaluation queries with :meth:`RAPTUser.privatize`, as a user would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from fedprompt.methods.rapt.inputs import PrivateExample, privatize_examples

if TYPE_CHECKING:
    from fedprompt.data import Example
    from fedprompt.methods.rapt.config import RAPTConfig


def round_share(examples: list, rounds: int, server_round: int, seed: int) -> list:
    """Share ``server_round`` (1-based) of ``rounds`` of a seeded shuffle of ``examples`` (empty after the last)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shares = np.array_split(order, rounds)
    return [examples[i] for i in shares[server_round - 1]] if server_round <= rounds else []


@dataclass(frozen=True)
class SentShare:
    """What a user sends in one round (``examples``) and numbers about it: ``tokens`` text tokens sent (plain
    tokens left out), of which the fraction ``tokens_unchanged`` came through d_chi unchanged (0 when none)."""

    examples: list[PrivateExample]
    tokens: int
    tokens_unchanged: float


class RAPTUser:
    """Privatizes examples with ``method``'s settings (text length, plain tokens and their vocabulary)."""

    def __init__(self, method: RAPTConfig, tokenizer, privatizer) -> None:
        self.method, self.tokenizer, self.privatizer = method, tokenizer, privatizer

    def privatize(self, rows: Sequence[Example], seed: int) -> tuple[list[PrivateExample], list[list[int]]]:
        """:func:`~fedprompt.methods.rapt.inputs.privatize_examples` with the run's settings."""
        method = self.method
        return privatize_examples(rows, self.tokenizer, self.privatizer, method.train.max_text_tokens, seed=seed,
                                  plain_tokens=method.plain_tokens, plain_vocab=method.reconstruction.plain_vocab)

    def send(self, examples: list, rounds: int, server_round: int, shuffle_seed: int, seed: int) -> SentShare:
        """Round ``server_round``'s share of ``examples`` (one shuffle from ``shuffle_seed`` for the whole run: every
        example leaves at most once), privatized from ``seed``."""
        private, raw = self.privatize(round_share(examples, rounds, server_round, shuffle_seed), seed)
        m, n = self.method.plain_tokens, len(private)
        # Text tokens as sent and as they were (texts, then pairs: privatize_examples' order), plain tokens left out.
        sent = [t for e in private for t in e.ids[m:]] + [t for e in private for t in (e.pair_ids or ())]
        before = [t for r in raw[:n] for t in r[m:]] + [t for r in raw[n:] for t in r]
        unchanged = float(np.mean(np.asarray(sent) == np.asarray(before))) if sent else 0.0
        return SentShare(private, len(sent), unchanged)
