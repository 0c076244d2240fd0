"""FedDTPT server aggregation on hand-made embeddings (and once on the embedded MiniLM)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedprompt.errors import ConfigError
from fedprompt.methods.feddtpt import AggregateConfig, FedDTPTAggregator, SentenceEmbedder, knee_eps


class TableEmbedder:
    """Hand-made embeddings; records what it was asked to embed."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = {w: np.asarray(v, dtype=float) for w, v in table.items()}
        self.calls: list[list[str]] = []

    def encode(self, words):
        self.calls.append(list(words))
        return np.stack([self.table[w] for w in words])


def arc(theta: float) -> np.ndarray:
    return np.array([math.cos(theta), math.sin(theta), 0.0])


def one_hot(i: int, d: int = 8) -> np.ndarray:
    v = np.zeros(d)
    v[i] = 1.0
    return v


# Cluster A near angle 0, cluster B near 90 degrees (spread 0.1 rad), three noise words far from all.
TWO_CLUSTERS = {
    "a0": arc(0.1), "a1": arc(0.0), "a2": arc(0.2),
    "b0": arc(math.pi / 2), "b1": arc(math.pi / 2 + 0.1), "b2": arc(math.pi / 2 + 0.2),
    "n0": [0, 0, 1.0], "n1": [-1, 0, 0.2], "n2": [0, -1, -0.5], "n3": [0, 0, -1.0],
}
# The tests of clustering switch the attention filter off; its own tests are further down.
NO_FILTER = AggregateConfig(attention_threshold=0)
TWO_CLUSTER_PROMPTS = [["a0", "n0", "b0"], ["b1", "a1", "n1", "n3"], ["b2", "n2", "a2"]]


def brute_force_weights(prompts, table):
    """The paper's weights written the slow, obvious way: sum of cosine to other clients' words, softmax."""
    unit = {w: np.asarray(v, float) / np.linalg.norm(v) for w, v in table.items()}
    out = []
    for c, prompt in enumerate(prompts):
        raw = [sum(float(unit[w] @ unit[o]) for d, other in enumerate(prompts) if d != c for o in other) for w in prompt]
        e = np.exp(np.array(raw) - max(raw))
        out.append(list(e / e.sum()))
    return out


def test_weights_are_softmaxed_similarity_to_other_clients():
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(TWO_CLUSTERS)).aggregate(TWO_CLUSTER_PROMPTS)
    expected = brute_force_weights(TWO_CLUSTER_PROMPTS, TWO_CLUSTERS)
    for got, want in zip(result.weights, expected):
        assert got == pytest.approx(want, abs=1e-9)
        assert sum(got) == pytest.approx(1.0)


def test_dbscan_keeps_one_word_per_cluster_at_the_knee_in_position_order():
    # min_eps below the knee, which therefore decides
    config = AggregateConfig(attention_threshold=0, min_samples=3, min_eps=1e-3, knee_k=3)
    result = FedDTPTAggregator(config, TableEmbedder(TWO_CLUSTERS)).aggregate(TWO_CLUSTER_PROMPTS)
    # k = 3 (self included): a cluster's k-distances are 1 - cos(0.1) and 1 - cos(0.2); the noise words'
    # are > 0.3. The knee of the sorted curve is the last in-cluster value.
    assert result.knee_found and not result.fallbacks and not result.eps_floored
    assert result.knee == result.eps
    assert result.eps == pytest.approx(1 - math.cos(0.2))
    assert (result.n_clusters, result.n_noise, result.min_samples) == (2, 4, 3)
    assert all(label == -1 for c, p in enumerate(TWO_CLUSTER_PROMPTS) for w, label in zip(p, result.labels[c])
               if w.startswith("n"))
    # Each cluster keeps its highest-weight member (by the brute-force weights) ...
    weights = brute_force_weights(TWO_CLUSTER_PROMPTS, TWO_CLUSTERS)
    flat = [(w, weights[c][i], (i + 0.5) / len(p)) for c, p in enumerate(TWO_CLUSTER_PROMPTS) for i, w in enumerate(p)]
    winners = [max((x for x in flat if x[0][0] == g), key=lambda x: x[1]) for g in "ab"]
    # ... ordered by relative position: here B's winner (first word of its prompt) precedes A's, the
    # reverse of the clusters' discovery order, so the order comes from positions, not cluster ids.
    assert result.prompt == [w for w, _, _ in sorted(winners, key=lambda x: x[2])] == ["b2", "a1"]
    assert [c["word"] for c in result.chosen] == result.prompt


def test_a_cluster_sits_where_most_clients_put_its_word():
    # Client 2's short prompt gives its words the highest weights, so both winners come from it, in its
    # order (y, x); two of three clients put x first, and the clusters' median positions follow them.
    table = {w: one_hot(i) for i, w in enumerate(["x", "y", "a1", "a2", "b1", "b2"])}
    prompts = [["x", "y", "a1", "a2"], ["x", "y", "b1", "b2"], ["y", "x"]]
    result = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=3), TableEmbedder(table)).aggregate(prompts)
    assert {c["client"] for c in result.chosen} == {2}
    assert result.prompt == ["x", "y"]


def test_identical_prompts_come_back_unchanged():
    table = {w: one_hot(i) for i, w in enumerate(["judge", "the", "review", "tone"])}
    prompts = [["judge", "the", "review", "tone"]] * 4
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(table)).aggregate(prompts)
    assert result.prompt == ["judge", "the", "review", "tone"]
    assert result.fallbacks == ["identical-replies"]


def test_knee_of_known_curves():
    assert knee_eps([0.01] * 10 + [0.3, 0.6, 0.9]) == pytest.approx(0.01)
    assert knee_eps(np.linspace(0.0, 1.0, 20)) is None  # a straight line has no knee
    assert knee_eps([0.5] * 10) is None  # flat
    assert knee_eps([0.1, 0.9]) is None  # too short to have one
    assert knee_eps([0.0] * 3 + [1.0] * 6) == 0.0  # a step to a plateau: the knee is at the step
    # Many identical words (distance 0) then a noisy tail of unrelated ones: the knee is the last dense
    # point, not a wiggle in the tail (where kneed's default first-knee-from-the-right lands).
    tail = np.random.default_rng(0).normal(0.9, 0.02, 300)
    assert knee_eps(np.concatenate([np.zeros(1200), tail])) == 0.0


def test_step_to_a_plateau_merges_only_the_shared_word():
    # Distinct words are mutually orthogonal (all at distance 1), "shared" is used by all three clients:
    # the k-distance curve is a step from 0 to a plateau at 1. The knee is at the step (eps = 1 would
    # merge every word), floored to min_eps.
    table = {w: one_hot(i) for i, w in enumerate(["shared", "x0", "x1", "x2", "y0", "y1", "y2"])}
    prompts = [["x0", "shared", "y0"], ["x1", "shared", "y1"], ["x2", "y2", "shared"]]
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(table)).aggregate(prompts)
    assert result.eps == pytest.approx(NO_FILTER.min_eps)
    assert result.prompt == ["shared"] and result.n_clusters == 1 and result.n_noise == 6


def test_no_knee_falls_back_to_min_eps():
    # All words mutually orthogonal: a flat k-distance curve has no knee; eps = min_eps, all noise.
    table = {w: one_hot(i) for i, w in enumerate(["x0", "x1", "x2", "y0", "y1", "y2"])}
    prompts = [["x0", "y0"], ["x1", "y1"], ["x2", "y2"]]
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(table)).aggregate(prompts)
    assert result.knee_found is False and result.eps == pytest.approx(NO_FILTER.min_eps)
    assert result.fallbacks == ["no-knee", "no-cluster"]
    assert result.prompt == ["x0", "y0"]  # all equally central: the lowest client index


def test_no_cluster_falls_back_to_the_most_central_client_prompt():
    # Fixed eps below every pairwise distance: all noise. Client 1's words each lie between two other
    # clients' words (cosine 0.71 to each); the other words are orthogonal to one another.
    r2 = 1 / math.sqrt(2)
    table = {"p": one_hot(0), "q": one_hot(1), "r": one_hot(2), "s": one_hot(3),
             "m1": r2 * (one_hot(0) + one_hot(2)), "m2": r2 * (one_hot(1) + one_hot(3))}
    prompts = [["p", "q"], ["m1", "m2"], ["r", "s"]]
    result = FedDTPTAggregator(AggregateConfig(attention_threshold=0, eps=0.01), TableEmbedder(table)).aggregate(prompts)
    assert result.n_clusters == 0 and result.n_noise == 6
    assert result.fallbacks == ["no-cluster"]
    assert result.prompt == ["m1", "m2"]


def test_min_samples_is_a_count_or_a_fraction_of_clients_capped_at_the_clients():
    fraction = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=0.3), TableEmbedder({}))
    assert [fraction.min_samples(n) for n in (1, 2, 3, 10, 1000)] == [1, 2, 2, 3, 300]
    count = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=5), TableEmbedder({}))
    assert [count.min_samples(n) for n in (1, 2, 10)] == [1, 2, 5]
    table = {w: one_hot(i) for i, w in enumerate(["same", "words", "here"])}
    aggregator = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=5), TableEmbedder(table))
    result = aggregator.aggregate([["same", "words", "here"], ["same", "words", "here", "here"]])
    assert result.min_samples == 2
    assert result.prompt == ["same", "words", "here"]


def test_each_distinct_word_is_embedded_once():
    table = {w: one_hot(i) for i, w in enumerate(["same", "words", "here", "odd"])}
    embedder = TableEmbedder(table)
    FedDTPTAggregator(NO_FILTER, embedder).aggregate([["same", "words", "here"]] * 5 + [["odd", "words"]])
    assert sorted(embedder.calls[0]) == ["here", "odd", "same", "words"]


def test_weighted_distinct_words_cluster_like_all_points():
    # 40 clients share most words; rare words (1-2 clients) must stay noise, shared ones survive.
    rng = np.random.default_rng(0)
    base = [f"b{i}" for i in range(6)]
    table = {w: one_hot(i, 36) for i, w in enumerate(base + [f"r{i}" for i in range(30)])}
    prompts = []
    for _ in range(40):
        p = list(base)
        p[int(rng.integers(6))] = f"r{int(rng.integers(30))}"
        prompts.append(p)
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(table)).aggregate(prompts)
    assert result.min_samples == 12 and result.prompt == base


def test_fedavg_maps_position_means_to_the_nearest_word():
    s = 1 / math.sqrt(2)
    table = {"a": [1, 0, 0], "b": [0, 1, 0], "m": [s, s, 0], "x": [0, 0, 1], "y": [0, 0.1, 1], "z": [0, -0.1, 1], "tail": [1, 1, 1]}
    prompts = [["a", "x"], ["b", "y", "tail"], ["m", "z"]]  # median length 2: "tail" has no position there
    result = FedDTPTAggregator(AggregateConfig(attention_threshold=0, mode="fedavg"), TableEmbedder(table)).aggregate(prompts)
    assert result.prompt == ["m", "x"]
    assert result.mode == "fedavg" and result.eps is None


def test_no_clustering_keeps_top_n_distinct_words_by_weight():
    table = {"common": one_hot(0), "rare1": one_hot(1), "rare2": one_hot(2), "rare3": one_hot(3)}
    prompts = [["common", "rare1"], ["common", "rare2"], ["rare3", "common"]]
    one = FedDTPTAggregator(AggregateConfig(attention_threshold=0, mode="no-clustering", top_n=1), TableEmbedder(table)).aggregate(prompts)
    assert one.prompt == ["common"]
    two = FedDTPTAggregator(AggregateConfig(attention_threshold=0, mode="no-clustering", top_n=2), TableEmbedder(table)).aggregate(prompts)
    assert two.prompt == ["common", "rare1"]  # "common" once (duplicates dropped); ties: lowest client


def test_kmeans_keeps_one_word_per_fixed_cluster():
    result = FedDTPTAggregator(AggregateConfig(attention_threshold=0, mode="kmeans", kmeans_k=2), TableEmbedder(TWO_CLUSTERS)).aggregate(
        [["a0", "b0"], ["b1", "a1"], ["a2", "b2"]]
    )
    assert result.n_clusters == 2 and result.n_noise == 0
    assert sorted(w[0] for w in result.prompt) == ["a", "b"]


def test_one_word_per_slot_keeps_the_edit_most_clients_share():
    # Seven clients edited the middle word of one prompt: four to "or", three to "and"; all kept the rest.
    table = {w: one_hot(i) for i, w in enumerate(["positive", "or", "and", "negative"])}
    prompts = [["positive", "or", "negative"]] * 4 + [["positive", "and", "negative"]] * 3
    per_cluster = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=3), TableEmbedder(table)).aggregate(prompts)
    assert per_cluster.prompt == ["positive", "or", "and", "negative"]  # the paper: one word per cluster
    per_slot = FedDTPTAggregator(AggregateConfig(attention_threshold=0, min_samples=3, one_word_per_slot=True), TableEmbedder(table))
    result = per_slot.aggregate(prompts)
    assert result.prompt == ["positive", "or", "negative"]
    assert result.dropped == [{"word": "and", "slot": 1}]
    # Flip the majority and the other edit wins.
    flipped = [["positive", "or", "negative"]] * 3 + [["positive", "and", "negative"]] * 4
    assert per_slot.aggregate(flipped).prompt == ["positive", "and", "negative"]


def test_cannot_link_keeps_apart_the_words_one_prompt_holds_together():
    # "positive" / "negative" sit as close as "movie" / "film": at one eps the paper's DBSCAN merges both pairs and
    # keeps one word of each. Every prompt holds both label words (so they are two words, not variants); no prompt
    # holds "movie" and "film" together (a substitution). "flick", near "movie", is one client's addition beside it.
    table = {"movie": arc(0.0), "film": arc(0.02), "flick": arc(0.04), "positive": arc(math.pi / 2),
             "negative": arc(math.pi / 2 + 0.02), "review": [0, 0, 1.0]}
    prompts = ([["movie", "review", "positive", "negative"]] * 4 + [["film", "review", "positive", "negative"]] * 2
               + [["movie", "flick", "review", "positive", "negative"]])
    settings = {"attention_threshold": 0, "min_samples": 3, "eps": 0.01}
    paper = FedDTPTAggregator(AggregateConfig(**settings), TableEmbedder(table)).aggregate(prompts)
    # one word per cluster, the highest-weight one: one of movie / film (/ flick), review, and ONE label word
    assert len(paper.prompt) == 3 and paper.prompt[1] == "review" and paper.cannot_link_splits == 0
    assert len({"positive", "negative"} & set(paper.prompt)) == 1
    linked = FedDTPTAggregator(AggregateConfig(**settings, cannot_link=True), TableEmbedder(table)).aggregate(prompts)
    assert linked.prompt[1:] == ["review", "positive", "negative"] and linked.prompt[0] in ("movie", "film")
    # split off: "negative" (kept, 7 occurrences) and "flick" (1 < min_samples: noise), not "film" (merged with movie)
    assert linked.cannot_link_splits == 2
    assert [labels[1] for labels in linked.labels][-1] == -1 and linked.labels[4][0] == linked.labels[0][0]


def test_bad_config_fails_before_any_embedding():
    with pytest.raises(ConfigError, match="aggregate.mode"):
        FedDTPTAggregator(AggregateConfig(mode="mean"), TableEmbedder({}))
    with pytest.raises(ConfigError, match="one_word_per_slot"):
        FedDTPTAggregator(AggregateConfig(mode="fedavg", one_word_per_slot=True), TableEmbedder({}))
    with pytest.raises(ConfigError, match="cannot_link splits DBSCAN's clusters"):
        FedDTPTAggregator(AggregateConfig(mode="kmeans", cannot_link=True), TableEmbedder({}))
    with pytest.raises(ConfigError, match="attention_threshold"):
        FedDTPTAggregator(AggregateConfig(attention_threshold=1.5), TableEmbedder({}))
    with pytest.raises(ConfigError, match="at least one"):
        FedDTPTAggregator(AggregateConfig(), TableEmbedder({})).aggregate([])


def test_default_embedder_minilm_end_to_end():
    embedder = SentenceEmbedder()  # all-MiniLM-L6-v2 from its PyPI package, offline
    good, great, table = embedder.encode(["good", "great", "table"])
    assert good.shape == (384,)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    assert cos(good, great) > cos(good, table)
    prompts = [
        "Is the sentiment of this movie review positive or negative?".split(),
        "Is the tone of this movie review positive or negative?".split(),
        "Is the sentiment of this film review positive or negative".split(),
    ]
    result = FedDTPTAggregator(AggregateConfig(), embedder).aggregate(prompts)
    assert result.prompt and set(result.prompt) <= {w for p in prompts for w in p}
    assert "review" in result.prompt and result.prompt.index("Is") < result.prompt.index("review")


# Six clients; three wrote "rate the film review", three the synonyms "grade the movie critique"; each also
# kept one word of its own. Each synonym pair lies in its own plane, at cosine distance 0.2, 0.25 and 0.3
# (above min_eps); every other pair of words is orthogonal (distance 1).
def _pair(i: int, distance: float) -> tuple[np.ndarray, np.ndarray]:
    theta = math.acos(1 - distance)
    return (np.r_[np.zeros(2 * i), 1.0, 0.0, np.zeros(14 - 2 * i)],
            np.r_[np.zeros(2 * i), math.cos(theta), math.sin(theta), np.zeros(14 - 2 * i)])


SYNONYMS = {w: one_hot(6 + i, 16) for i, w in enumerate(["the"] + [f"own{c}" for c in range(6)])}  # dims 6-12
for i, (a, b, d) in enumerate([("rate", "grade", 0.2), ("film", "movie", 0.25), ("review", "critique", 0.3)]):
    SYNONYMS[a], SYNONYMS[b] = _pair(i, d)
SYNONYM_PROMPTS = [["rate", "the", "film", "review", f"own{c}"] if c < 3 else ["grade", "the", "movie", "critique", f"own{c}"]
                   for c in range(6)]


def test_the_knee_is_taken_over_distinct_words_so_duplicates_do_not_pull_it_to_zero():
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(SYNONYMS)).aggregate(SYNONYM_PROMPTS)
    # 30 points, 13 distinct words. Over all points, copies of one word sit at distance 0 and drag the
    # knee there; over distinct words the curve is 0.2, 0.2, 0.25, 0.25, 0.3, 0.3, then 1 (seven words
    # with no synonym): the knee is the last synonym distance.
    assert result.knee == pytest.approx(0.3) and result.knee > NO_FILTER.min_eps
    assert result.eps == result.knee and not result.eps_floored and result.knee_found


def test_synonyms_from_different_clients_merge_when_the_elbow_says_so():
    result = FedDTPTAggregator(NO_FILTER, TableEmbedder(SYNONYMS)).aggregate(SYNONYM_PROMPTS)
    assert result.n_clusters == 4 and len(result.prompt) == 4  # the + one word of each synonym pair
    for pair in ({"rate", "grade"}, {"film", "movie"}, {"review", "critique"}):
        assert len(pair & set(result.prompt)) == 1
    assert result.prompt[1] == "the" and not any(w.startswith("own") for w in result.prompt)
    # A fixed eps below their distances (the old floor) keeps both of each pair: a prompt no client scored.
    fixed = FedDTPTAggregator(AggregateConfig(attention_threshold=0, eps=0.15), TableEmbedder(SYNONYMS))
    assert len(fixed.aggregate(SYNONYM_PROMPTS).prompt) == 7


def test_a_knee_below_min_eps_is_floored_and_says_so():
    config = AggregateConfig(attention_threshold=0, min_eps=0.5)
    result = FedDTPTAggregator(config, TableEmbedder(SYNONYMS)).aggregate(SYNONYM_PROMPTS)
    assert result.knee == pytest.approx(0.3) and result.eps == 0.5 and result.eps_floored


def test_the_attention_filter_drops_a_word_unlike_every_other_clients_words():
    table = {w: one_hot(i) for i, w in enumerate(["rate", "the", "review", "zebra"])}
    prompts = [["rate", "the", "review"], ["rate", "the", "review", "zebra"], ["rate", "the", "review"]]
    result = FedDTPTAggregator(AggregateConfig(attention_threshold=0.5), TableEmbedder(table)).aggregate(prompts)
    assert [(f["client"], f["position"], f["word"]) for f in result.filtered] == [(1, 3, "zebra")]
    assert result.filtered[0]["attention"] < 0.5 / 4  # under half its client's uniform share
    assert result.labels[1][3] == -2  # filtered before clustering; the shared words all clustered
    assert result.prompt == ["rate", "the", "review"]
    # With the filter off, "zebra" reaches DBSCAN (and is noise there: one client).
    off = FedDTPTAggregator(NO_FILTER, TableEmbedder(table)).aggregate(prompts)
    assert off.filtered == [] and off.labels[1][3] == -1


def test_the_filter_scale_does_not_depend_on_the_number_of_clients():
    table = {w: one_hot(i) for i, w in enumerate(["rate", "the", "review", "zebra"])}
    few = [["rate", "the", "review", "zebra"]] + [["rate", "the", "review"]] * 2
    many = [["rate", "the", "review", "zebra"]] + [["rate", "the", "review"]] * 200
    agg = FedDTPTAggregator(AggregateConfig(attention_threshold=0.5), TableEmbedder(table))
    a, b = agg.aggregate(few).filtered, agg.aggregate(many).filtered
    assert [f["word"] for f in a] == [f["word"] for f in b] == ["zebra"]
    assert a[0]["attention"] == pytest.approx(b[0]["attention"], rel=1e-6)  # mean, not sum, of similarities


def test_empty_and_identical_replies():
    table = {w: one_hot(i) for i, w in enumerate(["rate", "the", "review"])}
    agg = FedDTPTAggregator(NO_FILTER, TableEmbedder(table))
    assert agg.aggregate([["rate", "the"]] * 3).fallbacks == ["identical-replies"]
    majority = agg.aggregate([[], [], ["rate", "the"]])
    assert majority.prompt == [] and majority.fallbacks == ["majority-empty"] and majority.empty_replies == 2
    minority = agg.aggregate([[], ["rate", "the", "review"], ["rate", "the"]])
    assert minority.prompt == ["rate", "the"] and minority.empty_replies == 1 and minority.min_samples == 2


def test_agreement_attention_keeps_a_word_every_client_kept_however_unlike_the_rest():
    # "number?" is in every prompt but orthogonal to everything else; "rate"/"the" are near one another, as
    # instruction words are. The paper's similarity score filters the shared label word; agreement keeps it
    # and drops only the word no other client has.
    near = {"rate": arc(0.0), "the": arc(0.3), "type": arc(0.15)}
    table = {w: np.r_[v, np.zeros(5)] for w, v in near.items()}
    table.update({"number?": one_hot(5), "zebra": one_hot(6)})
    prompts = [["rate", "the", "type", "number?"], ["rate", "the", "type", "number?", "zebra"], ["rate", "the", "number?"]]
    paper = FedDTPTAggregator(AggregateConfig(attention_threshold=0.5), TableEmbedder(table)).aggregate(prompts)
    assert "number?" in {f["word"] for f in paper.filtered}
    agree = FedDTPTAggregator(AggregateConfig(attention_threshold=0.5, attention_score="agreement"),
                              TableEmbedder(table)).aggregate(prompts)
    assert {f["word"] for f in agree.filtered} == {"zebra"}
    assert "number?" in agree.prompt
    with pytest.raises(ConfigError, match="attention_score"):
        FedDTPTAggregator(AggregateConfig(attention_score="votes"), TableEmbedder({}))
