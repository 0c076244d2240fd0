"""No test data in any choice: every set a run learns or chooses from is checked disjoint from the
evaluation examples *by content*, not by split name.

Split names can lie (a hub dataset mapped twice, a hand-made folder whose validation file repeats test
sentences, the same sentence in train and test of a public benchmark: SST-2 has 2, TREC 11, AG News 5).
So each example gets a content key: the SHA-256 of its text and text_pair after Unicode NFKC
normalisation, case folding and whitespace collapsing (``"A  film."`` and ``"a film."`` are one
sentence). Labels are left out: a test sentence with another label is still a test sentence.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence, Set

import numpy as np

from fedprompt.data.task import Example
from fedprompt.errors import DataError

OVERLAP_POLICIES = ("refuse", "exclude")


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def content_key(example: Example) -> bytes:
    """SHA-256 digest of the example's normalised text (and text_pair); equal for equal sentences."""
    text = _normal(example.text)
    if example.text_pair is not None:
        text += "\x1f" + _normal(example.text_pair)  # unit separator: ("a", "b c") differs from ("a b", "c")
    return hashlib.sha256(text.encode("utf-8")).digest()


def content_ids(examples: Sequence[Example]) -> np.ndarray:
    """One uint64 per example (the first 8 bytes of its content key): compact ids for prediction files."""
    return np.array([int.from_bytes(content_key(e)[:8], "little") for e in examples], dtype=np.uint64)


def ids_digest(ids: np.ndarray) -> str:
    """SHA-256 of an id array: a run records it so a predictions file can be matched to the run's examples."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype=np.uint64).tobytes()).hexdigest()


def overlap(examples: Iterable[Example], keys: set[bytes]) -> int:
    """How many of ``examples`` share their content with one in ``keys``."""
    return sum(content_key(e) in keys for e in examples)


def without(examples: Sequence[Example], keys: Set[bytes]) -> list[Example]:
    """``examples`` minus those whose content is in ``keys`` (``federation.eval_overlap=exclude``)."""
    return [e for e in examples if content_key(e) not in keys]


EXCLUDE_REMEDY = "or set federation.eval_overlap=exclude to drop them from the learning sets before sampling"


def check_disjoint(learning: Mapping[str, Sequence[Example]], evaluation_name: str,
                   evaluation: Sequence[Example], remedy: str = EXCLUDE_REMEDY) -> None:
    """Refuse (:class:`DataError`, one line) the first named learning set that shares content with the
    evaluation examples. Call it before any model loads. ``remedy`` ends the message: what else the user
    can do where excluding rows is not possible (a student already distilled on them)."""
    keys = {content_key(e) for e in evaluation}
    for name, examples in learning.items():
        shared = overlap(examples, keys)
        if shared:
            raise DataError(
                f"{name}: {shared} of its {len(examples)} examples are also in the evaluation set "
                f"({evaluation_name}, {len(evaluation)} examples), by content: a choice or a prompt learnt from "
                f"them would be scored on data it has seen. Remove them from the data, evaluate on another split, {remedy}")
