"""d_chi-privacy for text: noise a token's embedding, emit the nearest vocabulary token.

The mechanism (Feyisetan et al. 2020; used by RAPT, Li, Tan, Liu 2023): for every token ``x`` of a text,

    z = l * v,   l ~ Gamma(d, scale=1/eta),   v uniform on the unit sphere of R^d
    x' = argmin_k || E[k] - (E[x] + z) ||

where ``E`` is a token-embedding matrix (default: the service model's input embeddings). ``z`` then has the
density ``p(z) ∝ exp(-eta ||z||)``, which makes the mechanism ``eta * d_E``-private: for any two tokens
``x, y`` and any output ``w``, ``P(w | x) <= exp(eta * ||E[x] - E[y]||) * P(w | y)``. Choosing ``x'`` from
``E[x] + z`` is post-processing, so it keeps the guarantee. ``E||z|| = d / eta``: for SmolLM2's 576-d
embeddings the useful range is eta ~ 15-60 (94% of SST-2 tokens survive eta = 60, 28% eta = 30, 7% eta = 20).
``eta = inf`` means no noise: the text comes back unchanged. docs/rapt.md says what the guarantee is worth.

Speed: the nearest-token search is one matrix product per chunk of tokens against the whole vocabulary.
It runs in bfloat16 (float32 where bf16 is slow: ``fast_bf16``) to shortlist ``shortlist`` candidates per
token (a blockwise top-k), and the shortlist is re-ranked with exact float32 distances, so the answer is the
exact nearest token unless rounding pushed it out of the top ``shortlist`` (it can only do so between
near-ties). Noise is drawn with numpy from one seed per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch

from fedprompt.data.task import Example
from fedprompt.errors import ConfigError, DataError
from fedprompt.models.registry import fast_bf16
from fedprompt.privacy.settings import DChiConfig

_BLOCK = 128  # vocabulary rows per block of the shortlist search (DChiPrivatizer._top_scores)


def sample_noise(num: int, dim: int, eta: float, rng: np.random.Generator) -> np.ndarray:
    """``num`` draws of ``z = l * v`` (float32, shape (num, dim)): ``l ~ Gamma(dim, 1/eta)``, ``v`` uniform on the sphere."""
    norms = rng.gamma(shape=dim, scale=1.0 / eta, size=num)
    directions = rng.standard_normal((num, dim), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return directions * norms[:, None].astype(np.float32)


def output_vocabulary(tokenizer, rows: int) -> list[int]:
    """Token ids a privatized text may contain: real rows of the embedding, no special or added tokens
    (a privatized review must not turn into chat markup such as ``<|im_start|>``)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in range(min(rows, len(tokenizer))) if i not in special]


class DChiPrivatizer:
    """The d_chi mechanism over one embedding matrix, vectorised over every token of a batch of texts."""

    def __init__(self, embedding: torch.Tensor, eta: float, allowed_ids: Sequence[int] | None = None, *,
                 chunk_size: int = 2048, shortlist: int = 8, device: str | torch.device | None = None) -> None:
        if embedding.ndim != 2:
            raise ConfigError(f"the embedding must be a (vocabulary, dim) matrix, got shape {tuple(embedding.shape)}")
        if not eta > 0:
            raise ConfigError(f"eta must be > 0, got {eta}")
        self.eta = float(eta)
        self.device = torch.device(device or "cpu")
        self.embedding = embedding.detach().float().to(self.device)
        ids = range(embedding.shape[0]) if allowed_ids is None else allowed_ids
        self.allowed = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
        if self.allowed.numel() == 0:
            raise ConfigError("the privatizer's output vocabulary is empty")
        candidates = self.embedding[self.allowed]
        # argmin ||c - y||^2 = argmax <y, c> - ||c||^2 / 2: one bf16 product with an extra column. The rows are
        # padded to whole blocks of _BLOCK with a score no real row can lose to (see _top_scores).
        half_sq = -0.5 * (candidates * candidates).sum(1, keepdim=True)
        pad = -candidates.shape[0] % _BLOCK
        padding = torch.cat([torch.zeros(pad, candidates.shape[1], device=self.device),
                             torch.full((pad, 1), -1e30, device=self.device)], 1)
        # bf16 only where it is fast: an emulated bf16 product is ~120x slower than fp32 (fast_bf16).
        self._coarse_dtype = torch.bfloat16 if fast_bf16(self.device.type) else torch.float32
        self._coarse = torch.cat([torch.cat([candidates, half_sq], 1), padding]).to(self._coarse_dtype)
        self._candidates = candidates
        self.chunk_size, self.shortlist = int(chunk_size), min(int(shortlist), self.allowed.numel())

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    def expected_noise_norm(self) -> float:
        return self.dim / self.eta

    @torch.no_grad()
    def nearest(self, points: torch.Tensor) -> torch.Tensor:
        """Id of the nearest output-vocabulary embedding to each row of ``points`` (float32, (n, dim))."""
        points = points.to(self.device, torch.float32)
        ones = torch.ones((points.shape[0], 1), device=self.device)
        coarse = torch.cat([points, ones], 1).to(self._coarse_dtype) @ self._coarse.T
        short = self._top_scores(coarse)  # (n, shortlist) rows of the candidate matrix
        exact = (self._candidates[short] - points[:, None, :]).pow(2).sum(-1)  # exact float32 squared distances
        return self.allowed[short.gather(1, exact.argmin(1, keepdim=True)).squeeze(1)]

    def _top_scores(self, coarse: torch.Tensor) -> torch.Tensor:
        """The columns of the ``shortlist`` largest scores of each row, as ``coarse.topk`` would give them (up
        to ties), but faster on a CPU: each of the k best scores lies in one of the k blocks with the best
        maxima (else k other blocks would each hold a larger score), so the top k is taken over those blocks
        only, after one max-reduction per block. A full topk over 49k columns costs more than the product."""
        n, k = coarse.shape[0], self.shortlist
        blocks = coarse.shape[1] // _BLOCK
        if blocks <= k:
            return coarse.topk(k, dim=1).indices
        grid = coarse.view(n, blocks, _BLOCK)
        best_blocks = grid.amax(-1).topk(k, dim=1).indices  # (n, k)
        scores = grid.gather(1, best_blocks[:, :, None].expand(-1, -1, _BLOCK)).reshape(n, k * _BLOCK)
        local = scores.topk(k, dim=1).indices
        return best_blocks.gather(1, local // _BLOCK) * _BLOCK + local % _BLOCK

    def privatize_ids(self, sequences: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        """Every token of every sequence replaced by its privatized token (same lengths), from ``seed``."""
        lengths = [len(s) for s in sequences]
        flat = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=sum(lengths))
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise DataError(f"token ids must be in [0, {self.vocab_size}) for this embedding, got "
                            f"{int(flat.min())}..{int(flat.max())}; was the text tokenized with another tokenizer?")
        if math.isinf(self.eta):  # no noise: the nearest token of E[x] is x itself
            out = flat
        else:
            rng = np.random.default_rng(seed)
            out = np.empty_like(flat)
            for start in range(0, flat.size, self.chunk_size):
                ids = torch.as_tensor(flat[start : start + self.chunk_size], device=self.device)
                noise = torch.from_numpy(sample_noise(ids.numel(), self.dim, self.eta, rng)).to(self.device)
                out[start : start + ids.numel()] = self.nearest(self.embedding[ids] + noise).cpu().numpy()
        return [part.tolist() for part in np.split(out, np.cumsum(lengths)[:-1])] if sequences else []

    def privatize_texts(self, texts: Sequence[str], tokenizer, seed: int) -> PrivatizedTexts:
        """Tokenize (no special tokens), privatize every token, decode: the privatized texts and their ids."""
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        private = self.privatize_ids(ids, seed)
        return PrivatizedTexts([tokenizer.decode(p) for p in private], private)

    def privatize_examples(self, examples: Sequence[Example], tokenizer, seed: int) -> list[Example]:
        """``examples`` with ``text`` and ``text_pair`` privatized (labels kept): what a client may send out."""
        pairs = [e.text_pair for e in examples if e.text_pair is not None]
        texts = self.privatize_texts([e.text for e in examples] + pairs, tokenizer, seed).texts
        private_pairs = iter(texts[len(examples):])
        return [replace(e, text=t, text_pair=None if e.text_pair is None else next(private_pairs))
                for e, t in zip(examples, texts)]


@dataclass(frozen=True)
class PrivatizedTexts:
    texts: list[str]
    ids: list[list[int]]


def load_privatizer(cfg: DChiConfig, model_name: str) -> tuple[DChiPrivatizer, Any]:
    """The privatizer of ``cfg`` over the input embeddings of ``cfg.embedding`` (else ``model_name``), and
    that model's tokenizer. Loads the model once (on CPU, float32) to copy its embedding matrix."""
    from fedprompt.models.registry import load_causal_lm, load_tokenizer, resolve_device

    if cfg.eta is None:
        raise ConfigError("privatize.eta is null (privatization off); set it to a number > 0")
    name = cfg.embedding or model_name
    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name, "cpu", "float32")
    embedding = model.get_input_embeddings().weight.detach().clone()
    del model
    privatizer = DChiPrivatizer(embedding, float(cfg.eta), output_vocabulary(tokenizer, embedding.shape[0]),
                                chunk_size=cfg.chunk_size, shortlist=cfg.shortlist, device=resolve_device(cfg.device))
    return privatizer, tokenizer
