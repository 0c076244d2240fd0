"""Candidate words for one slot of a discrete prompt.

A prompt is a list of whitespace words (the unit of the search and of the server's clustering). A
proposer gets the words left and right of a slot (and the word there now, if any) and returns up to
``n`` replacement words, best first. Proposers run on the client and see only the prompt, never the
client's examples or the black box's answers; the words they offer are whole-word vocabulary tokens
of a model (letters only), so every candidate prompt is plain text any service can read.

- ``lm-infill``: a causal LM the client owns ranks words by log p(context + left + word + right):
  a shortlist from the next-word distribution after the left context, reranked with the right context.
- ``mlm``: a fill-mask model's distribution at a ``[MASK]`` in the slot (the paper's "MLM API").
- ``embedding-neighbours``: the vocabulary words nearest (cosine) to the current word in a model's
  input-embedding table; an insert slot uses its neighbours' mean vector.
- ``random``: uniform vocabulary words (ablation).
"""

from __future__ import annotations

import abc
from functools import lru_cache
from typing import Collection, Sequence

import numpy as np
import torch

from fedprompt.errors import ConfigError
from fedprompt.methods.feddtpt.config import ProposerConfig
from fedprompt.models.scoring import cache_kwargs, output_cache
from fedprompt.models.vocab import whole_word_vocab


class Proposer(abc.ABC):
    """Ranks words for a slot; implementations are deterministic given ``rng``."""

    name: str = "proposer"

    @abc.abstractmethod
    def propose(
        self,
        left: Sequence[str],
        right: Sequence[str],
        current: str | None,
        n: int,
        exclude: Collection[str] = (),
        rng: np.random.Generator | None = None,
    ) -> list[str]:
        """Up to ``n`` distinct words for the slot between ``left`` and ``right``, best first, never
        ``current`` nor a word in ``exclude``. ``current`` is None for an insertion."""


def _allowed_mask(words: Sequence[str], index: dict[str, int], current: str | None, exclude: Collection[str]) -> np.ndarray:
    mask = np.ones(len(words), dtype=bool)
    for word in list(exclude) + ([current] if current else []):
        pos = index.get(word)
        if pos is not None:
            mask[pos] = False
    return mask


class LMInfillProposer(Proposer):
    """A local causal LM ranks whole-word tokens for the slot given both sides of it."""

    name = "lm-infill"

    def __init__(self, model, tokenizer, context: str = "Instruction:", shortlist: int = 16, min_len: int = 2,
                 vocab_limit: int | None = None) -> None:
        self.model, self.tokenizer, self.context, self.shortlist = model, tokenizer, context, shortlist
        words, ids = whole_word_vocab(tokenizer, min_len, vocab_limit)
        n_logits = model.get_output_embeddings().weight.shape[0]
        keep = [i for i, t in enumerate(ids) if t < n_logits]  # tokenizer may list added tokens the head lacks
        self.words = [words[i] for i in keep]
        self.ids = torch.tensor([ids[i] for i in keep], dtype=torch.long)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.device = next(model.parameters()).device

    def _prefix_ids(self, left: Sequence[str]) -> list[int]:
        text = " ".join([self.context, *left]).strip()
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        if not ids:  # the model needs one token to condition on
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            ids = [start]
        return ids

    def _first(self, left: Sequence[str]):
        """log p(word | context + left) over the vocabulary words, and the prefix's KV cache (or None)."""
        prefix = self._prefix_ids(left)
        out = _forward(self.model, torch.tensor([prefix], device=self.device), 1, use_cache=True)
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)[self.ids.to(self.device)]
        return prefix, logp, output_cache(out)

    def _rest(self, prefix: list[int], cache, word_ids: list[int], right_ids: list[int]) -> torch.Tensor:
        """log p(right | context + left + word) per candidate word id."""
        if not right_ids:
            return torch.zeros(len(word_ids), device=self.device)
        rows = torch.tensor([[w] + right_ids for w in word_ids], device=self.device)
        if cache is not None and hasattr(cache, "batch_repeat_interleave"):
            # Reuse the prefix's keys/values: only the word and the right context are computed per row.
            cache.batch_repeat_interleave(len(word_ids))
            logits = self.model(input_ids=rows, **cache_kwargs(self.model, cache)).logits
        else:  # no reusable cache: run the whole sequence (every row has the same length: no padding)
            full = torch.cat([torch.tensor([prefix] * len(word_ids), device=self.device), rows], dim=1)
            logits = _forward(self.model, full, rows.shape[1], use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        return logp.gather(-1, rows[:, 1:, None])[..., 0].sum(-1)

    def _right_ids(self, right: Sequence[str]) -> list[int]:
        return self.tokenizer(" " + " ".join(right), add_special_tokens=False)["input_ids"] if right else []

    @torch.no_grad()
    def scores(self, left: Sequence[str], right: Sequence[str], words: Sequence[str], reuse_cache: bool = True) -> np.ndarray:
        """log p(word, right | context + left) for vocabulary ``words`` (the rerank criterion)."""
        prefix, first, cache = self._first(left)
        picks = [self.index[w] for w in words]
        rest = self._rest(prefix, cache if reuse_cache else None, [int(self.ids[i]) for i in picks], self._right_ids(right))
        return (first[picks] + rest).cpu().numpy()

    @torch.no_grad()
    def propose(self, left, right, current, n, exclude=(), rng=None) -> list[str]:
        allowed = _allowed_mask(self.words, self.index, current, exclude)
        if n < 1 or not allowed.any():
            return []
        # Stage 1: a shortlist from the next-word distribution after the left context (one forward pass).
        prefix, first, cache = self._first(left)
        first = first.cpu().numpy()
        first[~allowed] = -np.inf
        size = min(max(self.shortlist, n), int(allowed.sum()))
        shortlist = np.argsort(-first, kind="stable")[:size]
        # Stage 2: rerank the shortlist by how well the right context follows each word.
        rest = self._rest(prefix, cache, [int(self.ids[i]) for i in shortlist], self._right_ids(right)).cpu().numpy()
        order = np.argsort(-(first[shortlist] + rest), kind="stable")
        return [self.words[shortlist[i]] for i in order[:n]]


class MLMProposer(Proposer):
    """A fill-mask model's top whole words at a mask token placed in the slot."""

    name = "mlm"

    def __init__(self, model, tokenizer, min_len: int = 2, vocab_limit: int | None = None) -> None:
        if tokenizer.mask_token is None:
            raise ConfigError(f"proposer 'mlm' needs a fill-mask model; {type(tokenizer).__name__} has no mask token")
        self.model, self.tokenizer = model, tokenizer
        words, ids = whole_word_vocab(tokenizer, min_len, vocab_limit)
        self.words, self.ids = words, torch.tensor(ids, dtype=torch.long)
        self.index = {w: i for i, w in enumerate(words)}
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def propose(self, left, right, current, n, exclude=(), rng=None) -> list[str]:
        allowed = _allowed_mask(self.words, self.index, current, exclude)
        if n < 1 or not allowed.any():
            return []
        text = " ".join([*left, self.tokenizer.mask_token, *right])
        enc = self.tokenizer(text, return_tensors="pt").to(self.device)
        where = (enc["input_ids"][0] == self.tokenizer.mask_token_id).nonzero()[0, 0]
        logits = self.model(**enc).logits[0, where].float()
        scores = logits[self.ids.to(self.device)].cpu().numpy()
        scores[~allowed] = -np.inf
        top = np.argsort(-scores, kind="stable")[: min(n, int(allowed.sum()))]
        return [self.words[i] for i in top]


class EmbeddingNeighbourProposer(Proposer):
    """Nearest vocabulary words (cosine) to the slot's word in an embedding table."""

    name = "embedding-neighbours"

    def __init__(self, words: Sequence[str], vectors: np.ndarray, encode) -> None:
        """``vectors`` (V, d) holds the vocabulary ``words``; ``encode(word) -> (d,)`` embeds any word."""
        self.words = list(words)
        self.vectors = _normalise(np.asarray(vectors, dtype=np.float32))
        self.encode = encode
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_model(cls, model, tokenizer, min_len: int = 2, vocab_limit: int | None = None) -> EmbeddingNeighbourProposer:
        table = model.get_input_embeddings().weight.detach().float().cpu().numpy()
        words, ids = whole_word_vocab(tokenizer, min_len, vocab_limit)
        keep = [i for i, t in enumerate(ids) if t < len(table)]

        def encode(word: str) -> np.ndarray:  # mean of the word's sub-tokens, as it would appear mid-prompt
            sub = tokenizer(" " + word, add_special_tokens=False)["input_ids"] or [0]
            return table[sub].mean(0)

        return cls([words[i] for i in keep], table[[ids[i] for i in keep]], encode)

    def propose(self, left, right, current, n, exclude=(), rng=None) -> list[str]:
        allowed = _allowed_mask(self.words, self.index, current, exclude)
        if n < 1 or not allowed.any():
            return []
        anchors = [current] if current else [w for w in (list(left[-1:]) + list(right[:1])) if w]
        if not anchors:  # an insertion into an empty prompt: nothing to be near to
            return RandomProposer(self.words).propose(left, right, current, n, exclude, rng)
        query = _normalise(np.mean([self.encode(w) for w in anchors], axis=0)[None])[0]
        sims = self.vectors @ query
        sims[~allowed] = -np.inf
        top = np.argsort(-sims, kind="stable")[: min(n, int(allowed.sum()))]
        return [self.words[i] for i in top]


class RandomProposer(Proposer):
    """Uniform words from a vocabulary (the ablation without a language model)."""

    name = "random"

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(dict.fromkeys(words))
        if not self.words:
            raise ConfigError("proposer 'random' needs a non-empty word list")
        self.index = {w: i for i, w in enumerate(self.words)}

    def propose(self, left, right, current, n, exclude=(), rng=None) -> list[str]:
        rng = rng if rng is not None else np.random.default_rng(0)
        pool = np.flatnonzero(_allowed_mask(self.words, self.index, current, exclude))
        if n < 1 or len(pool) == 0:
            return []
        return [self.words[i] for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def _forward(model, input_ids: torch.Tensor, keep: int, **kwargs):
    """The model's output with logits for the last ``keep`` positions only (spares rows x length x vocab)."""
    try:
        out = model(input_ids=input_ids, logits_to_keep=keep, **kwargs)
    except TypeError:  # an architecture without logits_to_keep
        out = model(input_ids=input_ids, **kwargs)
    out.logits = out.logits[:, -keep:]
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def build_proposer(cfg: ProposerConfig) -> Proposer:
    """Load the configured proposer's model (once per client process; reuse it across rounds)."""
    from fedprompt.models.registry import load_tokenizer

    name = cfg.model_name()
    if cfg.name == "random":
        return RandomProposer(whole_word_vocab(load_tokenizer(name), cfg.min_word_len, cfg.vocab_limit)[0])
    if cfg.name == "mlm":
        return _load_mlm(cfg)
    model = _load_lm(name, cfg.device, cfg.dtype)
    tokenizer = load_tokenizer(name)
    if cfg.name == "embedding-neighbours":
        return EmbeddingNeighbourProposer.from_model(model, tokenizer, cfg.min_word_len, cfg.vocab_limit)
    return LMInfillProposer(model, tokenizer, cfg.context, cfg.shortlist, cfg.min_word_len, cfg.vocab_limit)


@lru_cache(maxsize=2)
def _load_lm(name: str, device: str, dtype: str):
    # Cached: a simulation runs many clients in one process and each would otherwise load its own copy.
    from fedprompt.models.registry import load_causal_lm

    return load_causal_lm(name, device, dtype)


def _load_mlm(cfg: ProposerConfig) -> MLMProposer:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from fedprompt.errors import ModelError
    from fedprompt.models.registry import materialize, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    path = materialize(cfg.model_name())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForMaskedLM.from_pretrained(path, dtype=resolve_dtype(cfg.dtype, device))
    except (OSError, ValueError) as err:
        raise ModelError(f"proposer 'mlm': could not load a fill-mask model from {cfg.model!r}: {err}") from err
    model.to(device).eval().requires_grad_(False)
    return MLMProposer(model, tokenizer, cfg.min_word_len, cfg.vocab_limit)
