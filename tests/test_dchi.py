"""The d_chi privatizer and the nearest-neighbour inversion attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedprompt.data.task import Example
from fedprompt.errors import ConfigError, DataError
from fedprompt.privacy.attacks import nearest_neighbour_inversion, token_recovery
from fedprompt.privacy.dchi import DChiConfig, DChiPrivatizer, output_vocabulary, sample_noise
from tests.rapt_support import one_thread, tiny_lm  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    model, tokenizer = tiny_lm
    return tokenizer, model.get_input_embeddings().weight.detach().clone()


def privatizer(tiny, eta: float, **kwargs) -> DChiPrivatizer:
    tokenizer, embedding = tiny
    return DChiPrivatizer(embedding, eta, output_vocabulary(tokenizer, embedding.shape[0]), **kwargs)


@pytest.mark.parametrize("dim, eta", [(32, 5.0), (576, 30.0)])
def test_noise_norm_follows_gamma_d_over_eta_and_directions_are_uniform(dim, eta):
    noise = sample_noise(4000, dim, eta, np.random.default_rng(0))
    norms = np.linalg.norm(noise, axis=1)
    assert stats.kstest(norms, stats.gamma(a=dim, scale=1 / eta).cdf).pvalue > 0.01
    # The test has power: a slightly different norm law is rejected on the same draws.
    assert stats.kstest(norms, stats.gamma(a=dim * 1.1, scale=1 / eta).cdf).pvalue < 1e-6
    directions = noise / norms[:, None]
    assert np.abs(directions.mean(0)).max() < 4 / math.sqrt(4000)  # no preferred direction
    assert abs(float(np.mean(directions[:, 0] ** 2)) - 1 / dim) < 0.3 / dim  # each axis carries 1/d of it


def test_the_privatizer_adds_that_noise_to_each_token(tiny, monkeypatch):
    seen = []
    p = privatizer(tiny, 7.0)
    real = p.nearest
    monkeypatch.setattr(p, "nearest", lambda points: seen.append(points.clone()) or real(points))
    ids = [[5, 6, 7] * 400]
    p.privatize_ids(ids, seed=1)
    offsets = torch.cat(seen) - p.embedding[torch.tensor(ids[0])]
    norms = offsets.norm(dim=1).numpy()
    assert stats.kstest(norms, stats.gamma(a=p.dim, scale=1 / 7.0).cdf).pvalue > 0.01


def test_eta_infinity_and_huge_eta_return_the_input(tiny):
    tokenizer, _ = tiny
    texts = ["a great movie with a wonderful cast", "who wrote hamlet ?", ""]
    out = privatizer(tiny, math.inf).privatize_texts(texts, tokenizer, seed=0)
    assert out.texts == texts
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert privatizer(tiny, 1e9).privatize_ids(ids, seed=0) == ids  # noise ~1e-8: the exact nearest token is itself


def test_token_ids_are_always_valid_and_lengths_kept(tiny):
    tokenizer, embedding = tiny
    allowed = set(output_vocabulary(tokenizer, embedding.shape[0]))
    assert not allowed & set(tokenizer.all_special_ids)
    ids = [[tokenizer.bos_token_id, 17, 42], list(range(3, embedding.shape[0])), []]  # a special token as input too
    for eta in (0.05, 3.0, 300.0):
        out = privatizer(tiny, eta, chunk_size=64).privatize_ids(ids, seed=3)
        assert [len(s) for s in out] == [len(s) for s in ids]
        assert all(t in allowed for s in out for t in s)
    with pytest.raises(DataError, match="token ids must be in"):
        privatizer(tiny, 3.0).privatize_ids([[embedding.shape[0]]], seed=0)


def test_seeded_and_noisy(tiny):
    ids = [list(range(3, 200))]
    p = privatizer(tiny, 3.0)
    assert p.privatize_ids(ids, seed=5) == p.privatize_ids(ids, seed=5)
    assert p.privatize_ids(ids, seed=5) != p.privatize_ids(ids, seed=6)
    assert np.mean(np.array(p.privatize_ids(ids, seed=5)[0]) == np.array(ids[0])) < 0.5  # strong noise changes most tokens


def test_nearest_is_the_exact_nearest_token(tiny):
    p = privatizer(tiny, 1.0, shortlist=4)
    rng = np.random.default_rng(0)
    for scale in (0.01, 0.1, 1.0, 10.0):
        points = p.embedding[torch.as_tensor(rng.integers(3, p.vocab_size, 500))] + scale * torch.randn(500, p.dim)
        # In float64, so that only a tie at float32 precision (seen at scale 10) may pick another token.
        distances = torch.cdist(points.double(), p.embedding.double())
        nearest = p.nearest(points)
        found = distances.gather(1, nearest[:, None]).squeeze(1)
        best = distances[:, p.allowed].min(1).values
        assert torch.all(found <= best * (1 + 1e-6)), f"scale {scale}: a token farther than the nearest"
        assert (nearest == p.allowed[distances[:, p.allowed].argmin(1)]).float().mean() > 0.99


def test_blockwise_shortlist_is_the_top_k_and_keeps_the_search_exact_on_a_large_vocabulary():
    torch.manual_seed(0)
    embedding = torch.randn(3000, 24)  # 3000 rows: 24 blocks (the last one padded), more than the shortlist
    p = DChiPrivatizer(embedding, 1.0, list(range(2, 3000)), shortlist=6)
    scores = torch.randn(300, p._coarse.shape[0])  # float32: no ties
    assert torch.equal(p._top_scores(scores).sort(1).values, scores.topk(6, dim=1).indices.sort(1).values)
    points = embedding[torch.randint(0, 3000, (400,))] + 0.5 * torch.randn(400, 24)
    exact = p.allowed[torch.cdist(points, embedding[p.allowed]).argmin(1)]
    found = p.nearest(points)
    assert torch.equal(found, exact) and bool((found >= 2).all())  # never a padding row or an excluded id


def test_examples_keep_labels_and_privatize_both_texts(tiny):
    tokenizer, _ = tiny
    examples = [Example("a great movie", 1, "who wrote hamlet ?"), Example("a terrible film", 0, "new phone")]
    assert privatizer(tiny, math.inf).privatize_examples(examples, tokenizer, seed=0) == examples
    noisy = privatizer(tiny, 0.05).privatize_examples(examples, tokenizer, seed=0)
    assert [e.label for e in noisy] == [1, 0]
    assert all(n.text != e.text and n.text_pair != e.text_pair for n, e in zip(noisy, examples))


@pytest.mark.parametrize("node, match", [
    ({"eta": 0}, "must be > 0"), ({"eta": -1.0}, "must be > 0"), ({"eta": True}, "number"), ({"eta": "lots"}, "number"),
    ({"eta": 5, "typo": 1}, "unknown config key"), ({"eta": 5, "chunk_size": 0}, "chunk_size"), ({"eta": 5, "shortlist": 1.5}, "shortlist"),
])
def test_config_is_strict(node, match):
    with pytest.raises(ConfigError, match=match):
        DChiConfig.from_dict(node)


def test_config_accepts_off_numbers_and_infinity():
    assert not DChiConfig.from_dict(None).enabled and not DChiConfig.from_dict({"eta": None}).enabled
    assert DChiConfig.from_dict({"eta": 30}).eta == 30.0
    assert math.isinf(DChiConfig.from_dict({"eta": "inf"}).eta)
    assert math.isinf(DChiConfig.from_dict({"eta": float("inf")}).eta)


def test_nearest_neighbour_inversion_recovers_unchanged_tokens_and_counts_near_misses():
    embedding = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [10.0, 10.0]])
    assert nearest_neighbour_inversion([1, 1, 3], embedding, k=2).tolist() == [[1, 0], [1, 0], [3, 2]]
    result = token_recovery([[0, 1, 2, 3]], [[0, 0, 0, 3]], embedding, top_k=(1, 2))
    assert result["recovered@1"] == result["unchanged"] == 0.5  # tokens 0 and 3 came through
    assert result["recovered@2"] == 0.75  # token 1 is the second guess for an observed 0
    assert result["tokens"] == 4
    with pytest.raises(DataError, match="aligned"):
        token_recovery([[0, 1]], [[0]], embedding)
