"""What a RAPT user sends, and how the service turns it into model inputs.

User side (:func:`privatize_examples`): each text is tokenized with a leading space, cut to
``max_text_tokens``, random public plain tokens are put in front, and every token of the result is
privatized (d_chi). Only these privatized ids, the label and the plain tokens leave the user.

Service side (:class:`SlotEncoder`): the task's template (instruction, chat markup, answer prefix) is
tokenized once around its ``{text}`` / ``{text_pair}`` slots, and each privatized id sequence is put into
its slot as it is, never re-tokenized, so the plain tokens keep known positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError
from fedprompt.privacy.dchi import output_vocabulary


@dataclass(frozen=True)
class PrivateExample:
    """One example as a user sends it: ``ids`` = privatized [plain tokens + text tokens], the label,
    ``pair_ids`` (privatized) for pair tasks, and ``plain``: the plain tokens in clear, the reconstruction
    targets. Plain tokens are random public tokens, drawn afresh for every example: they carry nothing of
    the user's text."""

    ids: tuple[int, ...]
    label: int
    pair_ids: tuple[int, ...] | None = None
    plain: tuple[int, ...] = ()


def text_ids(tokenizer, text: str, max_tokens: int) -> list[int]:
    """A text's token ids as they appear after a space in the template (see :class:`SlotEncoder`)."""
    return tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][:max_tokens]


def plain_vocabulary(tokenizer, rows: int, size: int) -> list[int]:
    """The public tokens plain tokens are drawn from: the first ``size`` ids of the output vocabulary (BPE
    ids follow merge order, so these are the commonest tokens, like the ones texts are made of)."""
    return output_vocabulary(tokenizer, rows)[:size]


def privatize_examples(examples: Sequence[Example], tokenizer, privatizer, max_text_tokens: int, seed: int,
                       plain_tokens: int = 0, plain_vocab: int | None = None
                       ) -> tuple[list[PrivateExample], list[list[int]]]:
    """The user's step: put ``plain_tokens`` random plain tokens (distinct, from the first ``plain_vocab``
    ids of the privatizer's output vocabulary, see :func:`plain_vocabulary`) in front of each text and
    privatize every token, all from ``seed``. Returns the private examples and, for measuring only, the
    token ids before privatization (texts first, then pairs)."""
    rng = np.random.default_rng([seed, 0x5A97])
    vocab = privatizer.allowed.cpu().numpy()[:plain_vocab]
    if plain_tokens > len(vocab):
        raise ConfigError(f"{plain_tokens} distinct plain tokens asked for, but the vocabulary offers {len(vocab)}")
    plain = [rng.choice(vocab, size=plain_tokens, replace=False).tolist() for _ in examples]
    raw = [p + text_ids(tokenizer, e.text, max_text_tokens) for p, e in zip(plain, examples)]
    pairs = [text_ids(tokenizer, e.text_pair, max_text_tokens) for e in examples if e.text_pair is not None]
    private = privatizer.privatize_ids(raw + pairs, seed)
    private_pairs = iter(private[len(raw):])
    out = [PrivateExample(tuple(ids), e.label, tuple(next(private_pairs)) if e.text_pair is not None else None, tuple(p))
           for ids, e, p in zip(private, examples, plain)]
    return out, raw + pairs


_TEXT, _PAIR = "\x00TEXT\x00", "\x00PAIR\x00"


class SlotEncoder:
    """Token ids of the task's full input with privatized ids in the text slots, and where they sit."""

    def __init__(self, spec: TaskSpec, tokenizer, prompt: str | None = None) -> None:
        full = spec.format(Example(_TEXT, 0, _PAIR if spec.is_pair else None), prompt)
        parts = re.split(f"({re.escape(_TEXT)}|{re.escape(_PAIR)})", full)
        literals, self.slots = parts[0::2], parts[1::2]
        if self.slots.count(_TEXT) != 1 or self.slots.count(_PAIR) != int(spec.is_pair):
            raise ConfigError(f"task {spec.name!r}: the template must hold {{text}} once"
                              f"{' and {text_pair} once' if spec.is_pair else ''}, got {spec.template!r}")
        # The texts carry their own leading space (text_ids), so a literal's trailing space is dropped here.
        trimmed = [lit[:-1] if lit.endswith(" ") and i < len(self.slots) else lit for i, lit in enumerate(literals)]
        self.literals = [tokenizer(lit, add_special_tokens=False)["input_ids"] for lit in trimmed]
        probe, bare = tokenizer("x")["input_ids"], tokenizer("x", add_special_tokens=False)["input_ids"]
        cut = len(probe) - len(bare)
        self.literals[0] = (probe[:cut] if probe[cut:] == bare else []) + self.literals[0]  # e.g. a BOS token

    def encode(self, example: PrivateExample) -> list[int]:
        ids = list(self.literals[0])
        for slot, literal in zip(self.slots, self.literals[1:]):
            ids += example.ids if slot == _TEXT else (example.pair_ids or ())
            ids += literal
        return ids

    def text_start(self, example: PrivateExample) -> int:
        """Index (in :meth:`encode`'s output) of the first id of the text slot: the first plain token."""
        start = len(self.literals[0])
        for slot, literal in zip(self.slots, self.literals[1:]):
            if slot == _TEXT:
                return start
            start += len(example.pair_ids or ()) + len(literal)
        raise AssertionError("unreachable: the constructor checked that the template has a text slot")
