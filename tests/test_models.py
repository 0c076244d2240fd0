"""Models: registry checks, label-word scoring (padding, multi-token), calibration, SoftPrompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedprompt.errors import ConfigError, ModelError
from fedprompt.models import (
    SoftPrompt,
    calibrate_mean,
    check_model_name,
    encode_label_words,
    load_causal_lm,
    load_tokenizer,
    score_label_words,
)

TEXTS = ["a great movie", "a terrible film , boring and too long", "who wrote hamlet ?", "stocks fell"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


def _reference_scores(model, tok, texts, words):
    """Unbatched, unpadded: log p(word tokens | text) summed token by token."""
    out = np.zeros((len(texts), len(words)))
    for i, text in enumerate(texts):
        prefix = tok(text)["input_ids"]
        for c, word in enumerate(words):
            ids = tok(word, add_special_tokens=False)["input_ids"]
            seq = torch.tensor([prefix + ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq).logits[0].float(), -1)
            out[i, c] = sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(ids))
    return out


def test_model_names_are_checked_without_loading(tiny_model_dir):
    assert check_model_name("smollm2-135m") == "embedded"
    assert check_model_name(str(tiny_model_dir)) == "path"
    assert check_model_name("HuggingFaceTB/SmolLM2-135M") == "hub"
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        check_model_name("no-such-model")


def test_bad_device_and_dtype(tiny_model_dir):
    with pytest.raises(ModelError, match="unknown dtype"):
        load_causal_lm(str(tiny_model_dir), "cpu", "float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            load_causal_lm(str(tiny_model_dir), "cuda", "float32")


@pytest.mark.parametrize("words", [[" great", " terrible"], [" positive negative", " neutral", " a great movie"]])
def test_batched_left_padded_scores_match_unbatched_reference(tiny, words):
    model, tok = tiny
    got = score_label_words(model, tok, TEXTS, words, batch_size=3)
    np.testing.assert_allclose(got, _reference_scores(model, tok, TEXTS, words), atol=1e-4)


def test_label_words_that_tokenize_to_nothing_or_collide_are_rejected(tiny):
    _, tok = tiny
    with pytest.raises(ConfigError, match="tokenizes to nothing"):
        encode_label_words(tok, [" great", ""])
    with pytest.raises(ConfigError, match="same ids"):
        encode_label_words(tok, [" great", " great"])


def test_mean_calibration_removes_a_constant_label_bias():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    logits = np.where(labels[:, None] == np.arange(2), 1.0, 0.0) + rng.normal(0, 0.5, (200, 2))
    biased = logits + np.array([0.0, 3.0])  # the model loves label 1
    assert (biased.argmax(1) == labels).mean() < 0.7
    assert (calibrate_mean(biased).argmax(1) == labels).mean() > 0.8


def test_soft_prompt_prepends_and_extends_mask(tiny):
    model, tok = tiny
    prompt = SoftPrompt.from_text("a great movie", tok, model.get_input_embeddings(), num_tokens=7)
    embeds = torch.zeros(3, 5, model.config.hidden_size)
    mask = torch.tensor([[0, 0, 1, 1, 1]] * 3)
    out, out_mask = prompt(embeds, mask)
    assert out.shape == (3, 12, model.config.hidden_size)
    assert out_mask[:, :7].all() and (out_mask[:, 7:] == mask).all()
    ids = tok("a great movie", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(prompt.weight[0], model.get_input_embeddings().weight[ids[0]].float())
    with pytest.raises(ConfigError):
        SoftPrompt(0, 8)


def test_soft_prompt_scoring_is_batch_invariant_and_trainable(tiny):
    model, tok = tiny
    prompt = SoftPrompt(4, model.config.hidden_size)
    batched = score_label_words(model, tok, TEXTS, [" great", " terrible"], batch_size=4, soft_prompt=prompt)
    single = score_label_words(model, tok, TEXTS, [" great", " terrible"], batch_size=1, soft_prompt=prompt)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    ids = torch.tensor([tok("a great movie")["input_ids"]])
    embeds, mask = prompt(model.get_input_embeddings()(ids), torch.ones_like(ids))
    model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].sum().backward()
    assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_fast_bf16_on_cpu_follows_the_cpu_features_not_a_timing(monkeypatch):
    """The choice must be the same in every process of a run (a resumed run is a new process): a timing
    near its threshold can give two processes different dtypes (the likely cause of a CI failure in
    tests/test_resume.py: resumed and whole DP runs ended with different prompt bits)."""
    from fedprompt.models import registry

    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        registry.fast_bf16.cache_clear()
        assert registry.fast_bf16("cpu") is expected
    registry.fast_bf16.cache_clear()
    assert registry.fast_bf16("mps") is False  # no probe there: float32


def test_auto_dtype_is_bf16_only_where_bf16_is_fast(monkeypatch):
    from fedprompt.models import registry

    cpu = torch.device("cpu")
    assert registry.resolve_dtype("auto", cpu) == (torch.bfloat16 if registry.fast_bf16("cpu") else torch.float32)
    monkeypatch.setattr(registry, "fast_bf16", lambda device_type="cpu": False)  # a CPU without AVX512-BF16 / AMX
    assert registry.resolve_dtype("auto", cpu) == torch.float32
    assert registry.resolve_dtype(None, cpu) == torch.float32
    assert registry.resolve_dtype("bf16", cpu) == torch.bfloat16  # an explicit choice is kept
    monkeypatch.setattr(registry, "fast_bf16", lambda device_type="cpu": True)
    assert registry.resolve_dtype("auto", cpu) == torch.bfloat16


def test_loading_a_model_prints_no_progress_bar_and_leaves_the_setting_alone(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    from fedprompt.models import load_causal_lm

    load_causal_lm(str(tiny_model_dir), "cpu", "float32")
    assert "Loading weights" not in capfd.readouterr().err  # one bar per client actor per round flooded the console
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        load_causal_lm(str(tiny_model_dir), "cpu", "float32")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
