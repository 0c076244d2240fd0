"""FedDTPT's client step: token-level discrete prompt search against a black-box LM.

A prompt is a list of whitespace words. One call of :meth:`PromptSearch.run` is one client in one
round: it starts from the global prompt, draws a batch (local examples + a small class-balanced public
batch), scores the start prompt, then repeats until the query budget is spent:

1. pick an edit (replace a word, insert one, delete one, delete a span; weights in config) and a position, steered
   by the history: a position's weight is (edits there that improved + 1) / (steps there + 2), and with
   probability ``explore`` the position is uniform instead;
2. ask the proposer for new words there, skipping (position, old, new) triples already tried; a span
   deletion needs no proposer: its candidates delete 2, 4, 8, ... words from the position on, up to the
   end of the prompt, so one step can reach the empty prompt (zero-shot) when ``min_tokens`` is 0;
3. score every candidate prompt on the batch in one black-box call and keep the best one if the
   feedback does not drop (``accept: no-drop``, the paper's rule) or only if it rises (``improve``);
   feedback is the batch accuracy; or its balanced form, the mean recall over the classes in the batch,
   so that a client whose examples are mostly one class gains nothing by tilting the prompt toward that
   class (label skew is what makes non-IID clients disagree); or accuracy then the gold-label
   log-prob margin (needs log-probs).

The budget counts queries (examples scored); a step scores no more candidates than the rest of the
budget pays for, so the budget is never exceeded. Only texts ``spec.format(example, prompt)`` for
examples of this batch are ever sent; the proposer sees only prompt words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from fedprompt.blackbox.base import BlackBoxLM, Usage
from fedprompt.data.sampling import sample_balanced
from fedprompt.data.task import Example, TaskSpec
from fedprompt.errors import ConfigError, DataError
from fedprompt.methods.feddtpt.config import SearchConfig
from fedprompt.methods.feddtpt.proposers import Proposer


@dataclass
class Edit:
    """One scored (or, without feedback, applied) candidate edit."""

    step: int
    op: str  # replace | insert | delete | delete_span
    position: int  # index of the word replaced/deleted, or of the slot inserted into
    old: str | None  # None for an insertion
    new: str | None  # None for a deletion
    accuracy: float | None  # batch accuracy of the edited prompt; None when not scored (feedback=none)
    margin: float | None  # mean gold-label log-prob margin (feedback=margin only)
    accepted: bool
    span: int = 1  # words a deletion removed (delete_span: 2 or more, ``old`` holds them joined by spaces)


@dataclass
class SearchResult:
    """What a client's round of search produced; ``to_dict`` is what may travel to the server."""

    prompt: list[str]
    accuracy: float | None  # on the search batch (local + public) of the final prompt
    local_accuracy: float | None  # on the local part of the batch only
    start_accuracy: float | None
    history: list[Edit] = field(default_factory=list)
    queries: int = 0  # examples scored by this search
    usage: Usage = field(default_factory=Usage)  # the black box's own accounting over this search
    steps: int = 0

    @property
    def text(self) -> str:
        return " ".join(self.prompt)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["usage"] = self.usage.to_dict()
        return out


@dataclass(frozen=True)
class _Score:
    accuracy: float
    local_accuracy: float
    balanced: float  # mean recall over the classes present in the batch
    margin: float | None


class PromptSearch:
    """Client-side search; build once per client process (the proposer holds a model) and call ``run``."""

    def __init__(self, config: SearchConfig, proposer: Proposer) -> None:
        config.validate()
        self.config, self.proposer = config, proposer

    def run(
        self,
        blackbox: BlackBoxLM,
        spec: TaskSpec,
        prompt: Sequence[str] | str,
        local: Sequence[Example],
        public: Sequence[Example] = (),
        seed: int | Sequence[int] = 0,
        public_seed: int | Sequence[int] | None = None,
        edit_seed: int | Sequence[int] | None = None,
    ) -> SearchResult:
        """Improve ``prompt`` on ``local`` (+ a balanced batch of ``public``) within the query budget.

        ``seed`` should differ per client and round, e.g. ``(run_seed, server_round, partition_id)``
        (numpy mixes a sequence of ints; avoid ``hash()`` of strings, which changes per process). The
        search is deterministic given the seed, the black box's answers and the proposer.
        ``public_seed`` seeds the public draws alone: give every client of a round the same one and they
        all score on the same public examples (``search.public_shared``); None draws them from ``seed``.
        ``edit_seed`` likewise seeds the choice of edits alone (operation, position, the proposer's draws):
        clients given the same one try the same edits in the same order for as long as their prompts agree,
        so an edit that helps most of them is kept by most of them (``search.shared_edits``).
        """
        return _Run(self.config, self.proposer, blackbox, spec, prompt, local, public, seed, public_seed,
                    edit_seed).search()


class _Run:
    """The state of one search call (kept off PromptSearch so that a search object is reusable)."""

    def __init__(self, cfg, proposer, blackbox, spec, prompt, local, public, seed, public_seed=None,
                 edit_seed=None) -> None:
        self.cfg, self.proposer, self.bb, self.spec = cfg, proposer, blackbox, spec
        # An empty start prompt is the zero-shot instruction; the search can only insert into it.
        self.tokens = prompt.split() if isinstance(prompt, str) else [w for w in prompt if w.strip()]
        if not local:
            raise DataError("the client has no local examples to search on")
        self.local, self.public = list(local), list(public)
        self.rng = np.random.default_rng(seed)
        self.public_rng = self.rng if public_seed is None else np.random.default_rng(public_seed)
        self.edit_rng = self.rng if edit_seed is None else np.random.default_rng(edit_seed)
        self.queries = 0
        self.history: list[Edit] = []
        self.tried: set[tuple[int, str | None, str | None]] = set()
        self.exhausted: set[tuple[str, int]] = set()  # (op, position) with no untried candidate left
        self.tries = [0] * len(self.tokens)
        self.gains = [0] * len(self.tokens)
        self.cache: dict[str, _Score] = {}
        self.labels_only = cfg.feedback != "margin"
        self._draw_batch()

    # ---- the batch and its scoring ----------------------------------------------------------------
    def _draw_batch(self) -> None:
        cfg = self.cfg
        take = min(cfg.local_batch_size, len(self.local))
        local = [self.local[i] for i in self.rng.choice(len(self.local), size=take, replace=False)]
        public: list[Example] = []
        if self.public and cfg.public_batch_size > 0:
            seed = int(self.public_rng.integers(2**31))
            public = sample_balanced(self.public, cfg.public_batch_size, self.spec.num_labels, seed)
        self.batch, self.n_local = local + public, len(local)
        self.gold = np.array([e.label for e in self.batch])
        self.cache.clear()  # scores are only comparable on the same batch

    def _affordable(self) -> int:
        """How many more prompts the budget pays for on the current batch."""
        return (self.cfg.budget - self.queries) // len(self.batch)

    def _score(self, prompts: list[list[str]]) -> list[_Score]:
        """Scores of ``prompts`` on the batch: one black-box call for those not scored on it yet."""
        texts = [" ".join(p) for p in prompts]
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            if len(new) * len(self.batch) > self.cfg.budget - self.queries:  # guarded by callers; never overspend
                raise RuntimeError("internal error: a search step would exceed the query budget")
            inputs = [self.spec.format(e, t) for t in new for e in self.batch]
            result = self.bb.classify(inputs, list(self.spec.label_words), labels_only=self.labels_only)
            self.queries += len(inputs)
            if len(result.predictions) != len(inputs):
                raise RuntimeError(f"the black box answered {len(result.predictions)} predictions for {len(inputs)} inputs")
            if not self.labels_only and result.logprobs is None:
                raise ConfigError("search.feedback=margin needs log-probs, but the black box returned labels only; "
                                  "use search.feedback=accuracy")
            preds = np.asarray(result.predictions).reshape(len(new), len(self.batch))
            logprobs = None if result.logprobs is None else np.asarray(result.logprobs).reshape(len(new), len(self.batch), -1)
            for i, text in enumerate(new):
                correct = preds[i] == self.gold
                margin = None
                if not self.labels_only and logprobs is not None:  # without labels_only they are there (checked above)
                    lp = logprobs[i]
                    gold = lp[np.arange(len(self.gold)), self.gold]
                    others = np.where(np.eye(lp.shape[1], dtype=bool)[self.gold], -np.inf, lp).max(1)
                    margin = float(np.mean(gold - others))
                recall = [correct[self.gold == c].mean() for c in np.unique(self.gold)]
                self.cache[text] = _Score(float(correct.mean()), float(correct[: self.n_local].mean()),
                                          float(np.mean(recall)), margin)
        return [self.cache[t] for t in texts]

    def _key(self, score: _Score) -> tuple:
        if self.cfg.feedback == "balanced":
            return (score.balanced,)
        return (score.accuracy,) if score.margin is None else (score.accuracy, score.margin)

    # ---- choosing an edit -------------------------------------------------------------------------
    def _ops(self) -> list[str]:
        n = len(self.tokens)
        if n == 0:  # the empty prompt: only an insertion can change it
            return ["insert"] if self.cfg.edit_ops.get("insert", 0) > 0 and ("insert", 0) not in self.exhausted else []
        ops = [op for op, w in self.cfg.edit_ops.items() if w > 0]
        if n <= self.cfg.min_tokens:
            ops = [op for op in ops if op != "delete"]
        if n < self.cfg.min_tokens + 2:  # a span is 2 words or more
            ops = [op for op in ops if op != "delete_span"]
        if n >= self.cfg.max_tokens:
            ops = [op for op in ops if op != "insert"]
        return [op for op in ops if any((op, p) not in self.exhausted for p in range(n))]

    def _pick(self) -> tuple[str, int] | None:
        ops = self._ops()
        if not ops:
            return None
        if not self.tokens:
            return "insert", 0
        w = np.array([self.cfg.edit_ops[op] for op in ops], dtype=float)
        op = ops[self.edit_rng.choice(len(ops), p=w / w.sum())]
        open_ = np.array([(op, p) not in self.exhausted for p in range(len(self.tokens))], dtype=float)
        steer = (np.array(self.gains) + 1.0) / (np.array(self.tries) + 2.0) * open_
        weights = open_ if self.edit_rng.random() < self.cfg.explore else steer
        return op, int(self.edit_rng.choice(len(self.tokens), p=weights / weights.sum()))

    def _candidates(self, op: str, pos: int, limit: int) -> list[tuple[int, str | None, str | None, list[str]]]:
        """Up to ``limit`` untried edits as (position, old, new, edited prompt); a span deletion's ``old``
        is the deleted words joined by spaces."""
        t = self.tokens
        if op == "delete":
            key = (pos, t[pos], None)
            return [] if key in self.tried else [(pos, t[pos], None, t[:pos] + t[pos + 1 :])]
        if op == "delete_span":
            most = len(t) - max(self.cfg.min_tokens, 0)  # words that may go
            lengths = sorted({min(2**i, len(t) - pos, most) for i in range(1, 8)} - {0, 1})
            spans: list[tuple[int, str | None, str | None, list[str]]] = [
                (pos, " ".join(t[pos : pos + k]), None, t[:pos] + t[pos + k :]) for k in lengths]
            return [c for c in spans if c[:3] not in self.tried][:limit]
        if op == "insert":
            slot = pos + int(self.edit_rng.integers(2)) if t else 0  # before or after the picked word
            left, right, old = t[:slot], t[slot:], None
        else:
            slot, left, right, old = pos, t[:pos], t[pos + 1 :], t[pos]
        done = {new for (p, o, new) in self.tried if p == slot and o == old}
        words = self.proposer.propose(left, right, old, limit, exclude=done, rng=self.edit_rng)
        words = [w for w in dict.fromkeys(words) if w and w != old and w not in done and not any(c.isspace() for c in w)]
        return [(slot, old, w, left + [w] + right) for w in words[:limit]]

    # ---- applying an edit -------------------------------------------------------------------------
    def _apply(self, op: str, slot: int, tokens: list[str]) -> None:
        """Make ``tokens`` current, shifting per-position statistics and tried triples on insert/delete."""
        removed = len(self.tokens) - len(tokens)  # words a deletion took out (from ``slot`` on)
        self.tokens = tokens
        if op == "replace":
            return
        if op == "insert":
            self.tries.insert(slot, 0)
            self.gains.insert(slot, 0)
            self.tried = {(p + 1 if p >= slot else p, o, n) for p, o, n in self.tried}
        else:  # delete(_span): triples inside the deleted words are void, later ones move left
            del self.tries[slot : slot + removed], self.gains[slot : slot + removed]
            self.tried = {(p - removed if p >= slot + removed else p, o, n) for p, o, n in self.tried
                          if not slot <= p < slot + removed}

    # ---- the loop ---------------------------------------------------------------------------------
    def search(self) -> SearchResult:
        cfg = self.cfg
        start_usage = self.bb.usage.copy()
        if self._affordable() < 2:
            raise ConfigError(
                f"search.budget={cfg.budget} cannot score the start prompt and one candidate on a batch of "
                f"{len(self.batch)} examples; raise the budget or shrink the batches"
            )
        current = self._score([self.tokens])[0]
        start = current
        no_feedback = cfg.feedback == "none"
        max_steps = cfg.max_steps
        if no_feedback and max_steps is None:
            # As many edits as a feedback search would make with this budget, keeping one batch for the end.
            max_steps = max(0, (self._affordable() - 1) // cfg.candidates_per_step)
        steps, stale = 0, False
        while max_steps is None or steps < max_steps:
            if stale:  # resample_batch: a fresh batch per step, so the current prompt is scored again on it
                if self._affordable() < 2:
                    break
                self._draw_batch()
                current, stale = self._score([self.tokens])[0], False
            room = 1 if no_feedback else min(cfg.candidates_per_step, self._affordable())
            if room < 1:
                break
            pick = self._pick()
            if pick is None:
                break  # every position is exhausted for every allowed edit
            op, pos = pick
            cands = self._candidates(op, pos, room)
            if not cands:
                self.exhausted.add((op, pos))
                continue
            steps += 1
            if self.tokens:
                self.tries[pos] += 1
            for slot, old, new, _ in cands:
                self.tried.add((slot, old, new))
            if no_feedback:
                slot, old, new, tokens = cands[0]
                self.history.append(Edit(steps, op, slot, old, new, None, None, True,
                                         len(old.split()) if op == "delete_span" and old is not None else 1))
                self._apply(op, slot, tokens)
                self.exhausted.clear()
                continue
            scores = self._score([c[3] for c in cands])
            stale = cfg.resample_batch
            best = max(range(len(cands)), key=lambda i: self._key(scores[i]))  # first of equals: proposer's order
            gain = self._key(scores[best]) > self._key(current)
            accept = gain or (cfg.accept == "no-drop" and self._key(scores[best]) == self._key(current))
            for i, (slot, old, new, _) in enumerate(cands):
                s = scores[i]
                span = len(old.split()) if op == "delete_span" and old is not None else 1  # a span's old is a str
                self.history.append(Edit(steps, op, slot, old, new, s.accuracy, s.margin, accept and i == best, span))
            if accept:
                if gain and self.tokens:
                    self.gains[pos] += 1
                slot, _, _, tokens = cands[best]
                self._apply(op, slot, tokens)
                current = scores[best]
                self.exhausted.clear()  # the context changed: proposers may offer new words anywhere
        final = current if not no_feedback else (self._score([self.tokens])[0] if self._affordable() >= 1 else None)
        return SearchResult(
            prompt=list(self.tokens),
            accuracy=None if final is None else final.accuracy,
            local_accuracy=None if final is None else final.local_accuracy,
            start_accuracy=start.accuracy,
            history=self.history,
            queries=self.queries,
            usage=self.bb.usage.minus(start_usage),
            steps=steps,
        )
