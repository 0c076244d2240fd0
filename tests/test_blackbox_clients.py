"""The three BlackBoxLM clients agree with each other and with score_label_words; retries; the factory."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import torch

from fedprompt.blackbox import (
    BudgetExhausted,
    HttpBlackBox,
    InProcessBlackBox,
    Limits,
    OpenAICompatibleBlackBox,
    ServiceUnavailable,
    make_blackbox,
)
from fedprompt.blackbox.errors import InvalidRequest, PayloadTooLarge, ValidationFailed
from fedprompt.blackbox.openai_client import label_floor, normalize_base_url
from fedprompt.blackbox.runner import RunningServer, free_port
from fedprompt.blackbox.server import create_app
from fedprompt.blackbox.settings import Budget, ServerSettings
from fedprompt.config import compose
from fedprompt.models import load_causal_lm, load_tokenizer, score_label_words
from tests.blackbox_support import TEXTS, serving

LIMITS = Limits(max_batch=8, max_prompt_tokens=64)
MULTI = [" positive", " negative", " yes"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server(tiny):
    with serving(*tiny, limits=LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def top_k_case(tiny):
    """Texts and labels for the first-token OpenAI path: two single-token labels that are among the top-20
    next tokens after each of these texts (so the client sees them), and one that is in none (floored)."""
    model, tok = tiny
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(model(torch.tensor([tok(t)["input_ids"]])).logits[0, -1], -1) for t in TEXTS])
    tops = [set(torch.topk(row, 20).indices.tolist()) for row in logp]

    def round_trips(i: int) -> bool:
        text = tok.decode([i])
        return text.strip() != "" and "\ufffd" not in text and tok(text, add_special_tokens=False)["input_ids"] == [i]

    ids = sorted(i for i in set.union(*tops) if round_trips(i))
    a, b = max(((a, b) for a in ids for b in ids if a < b), key=lambda p: sum(p[0] in t and p[1] in t for t in tops))
    texts = [t for t, top in zip(TEXTS, tops) if a in top and b in top]
    top_text = {tok.decode([i]) for t, top in zip(TEXTS, tops) if t in texts for i in top}
    absent = next(tok.decode([i]) for i in range(logp.shape[1]) if round_trips(i)
                  and not any(tok.decode([i]).startswith(piece) for piece in top_text))
    assert len(texts) >= 2, "the tiny model changed: no two labels share the top-20 of two texts"
    return texts, [tok.decode([a]), tok.decode([b]), absent]


def test_inprocess_equals_score_label_words_and_http(tiny, server):
    truth = score_label_words(*tiny, TEXTS, MULTI)
    local = InProcessBlackBox(*tiny, chunk_size=3, limits=LIMITS, model_id="tiny")
    result = local.classify(TEXTS, MULTI)
    np.testing.assert_array_equal(result.logprobs, truth)
    assert result.predictions == truth.argmax(1).tolist()
    with HttpBlackBox(server.url, chunk_size=3) as remote:
        over_http = remote.classify(TEXTS, MULTI)
    np.testing.assert_allclose(over_http.logprobs, truth, atol=1e-5)
    # Same chunking, same model id: the in-process estimate of the wire cost is the HTTP client's count.
    assert result.usage == over_http.usage and local.usage == remote.usage
    assert result.usage.requests == 3 and result.usage.queries == len(TEXTS) and result.usage.bytes_sent > 0


def test_openai_first_token_agrees_where_the_label_is_in_the_top_k(tiny, server, top_k_case):
    model, tok = tiny
    texts, labels = top_k_case
    truth = score_label_words(model, tok, texts, labels)
    for tokenizer in (tok, None):  # exact first tokens, and the prefix heuristic
        with OpenAICompatibleBlackBox(server.url, "tiny", tokenizer=tokenizer, chunk_size=len(texts) - 1) as client:
            result = client.classify(texts, labels)
        assert not result.floored[:, :2].any() and result.floored[:, 2].all()
        np.testing.assert_allclose(result.logprobs[:, :2], truth[:, :2], atol=1e-5)
        # The floor bounds the absent label's true log-prob from above.
        assert (result.logprobs[:, 2] >= truth[:, 2]).all()
        assert result.usage.requests == 2 and result.usage.queries == len(texts)


def test_openai_echo_mode_is_exact_for_multi_token_labels(tiny, server):
    truth = score_label_words(*tiny, TEXTS, MULTI)
    with OpenAICompatibleBlackBox(server.url + "/v1", "tiny", label_mode="echo", chunk_size=6) as client:
        result = client.classify(TEXTS, MULTI)
        only = client.classify(TEXTS, MULTI, labels_only=True)
    np.testing.assert_allclose(result.logprobs, truth, atol=1e-5)
    assert only.logprobs is None and only.predictions == truth.argmax(1).tolist()


def test_first_token_mode_refuses_labels_it_cannot_tell_apart(tiny, server):
    with OpenAICompatibleBlackBox(server.url, "tiny", tokenizer=tiny[1]) as client:
        with pytest.raises(ValidationFailed, match="share a first token"):
            client.classify(TEXTS, [" negative", " neutral"])  # both start with " ne"


def test_clients_raise_the_servers_errors(tiny, server):
    local = InProcessBlackBox(*tiny, chunk_size=8, limits=LIMITS, model_id="tiny")
    with HttpBlackBox(server.url, chunk_size=8) as remote:
        for labels, error in (([" p", ""], ValidationFailed), ([" p", " p"], ValidationFailed)):
            with pytest.raises(error) as in_process:
                local.classify(TEXTS, labels)
            with pytest.raises(error) as over_http:
                remote.classify(TEXTS, labels)
            assert in_process.value.message in over_http.value.message
        with pytest.raises(PayloadTooLarge):
            InProcessBlackBox(*tiny, chunk_size=8, limits=Limits(max_batch=8, max_prompt_tokens=4)).classify(TEXTS, [" p"])
    assert local.usage.requests == 0


def test_inprocess_budget_matches_the_server_rule(tiny):
    local = InProcessBlackBox(*tiny, budget=Budget(queries=10))
    local.classify(TEXTS, [" p", " ne"])
    with pytest.raises(BudgetExhausted, match="queries used 8 of 10"):
        local.classify(TEXTS, [" p", " ne"])
    assert local.usage.queries == 8


def test_empty_input_costs_nothing(tiny, server):
    with HttpBlackBox(server.url) as remote:
        assert remote.classify([], [" p"]).predictions == [] and remote.usage.requests == 0


# ---- retries ---------------------------------------------------------------------------------------

def _scripted(*answers):
    """A MockTransport answering ``answers`` in order (an exception class is raised instead)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        answer = answers[min(len(calls) - 1, len(answers) - 1)]
        if isinstance(answer, type) and issubclass(answer, Exception):
            raise answer("scripted failure", request=request)
        status, headers, body = answer
        return httpx.Response(status, headers=headers, json=body)

    return httpx.MockTransport(handler), calls


OK = (200, {}, {"predictions": [1], "logprobs": [[-2.0, -1.0]], "usage": {"queries": 1, "prompt_tokens": 3}})


@pytest.mark.parametrize("answers, attempts, slept", [
    ([(503, {}, {"error": {"message": "busy"}}), (502, {}, {}), OK], 3, [0.5, 1.0]),
    ([(429, {"Retry-After": "3"}, {"error": {"message": "overloaded"}}), OK], 2, [3.0]),
    ([httpx.ConnectError, httpx.ConnectError, OK], 3, [0.5, 1.0]),
])
def test_retries_with_backoff_then_succeed(answers, attempts, slept):
    transport, calls = _scripted(*answers)
    sleeps = []
    with HttpBlackBox("http://fake", transport=transport, sleep=sleeps.append, retries=4) as client:
        result = client.classify(["a"], [" p", " ne"])
    assert result.predictions == [1] and len(calls) == attempts
    assert len(sleeps) == len(slept)
    for got, want in zip(sleeps, slept):  # exponential backoff (or Retry-After) plus up to 10% jitter
        assert want <= got <= want * 1.1 + 1e-9


@pytest.mark.parametrize("answer, error", [
    ((429, {}, {"error": {"message": "budget exhausted", "code": "insufficient_quota"}}), BudgetExhausted),
    ((400, {}, {"error": {"message": "bad"}}), InvalidRequest),
    ((413, {}, {"error": {"message": "big"}}), PayloadTooLarge),
])
def test_client_errors_are_not_retried(answer, error):
    transport, calls = _scripted(answer)
    with HttpBlackBox("http://fake", transport=transport, sleep=lambda s: None) as client:
        with pytest.raises(error):
            client.classify(["a"], [" p"])
    assert len(calls) == 1


def test_gives_up_after_the_last_retry():
    transport, calls = _scripted(httpx.ConnectError)
    with HttpBlackBox("http://fake", transport=transport, sleep=lambda s: None, retries=2) as client:
        with pytest.raises(ServiceUnavailable, match="after 3 attempts"):
            client.classify(["a"], [" p"])
    assert len(calls) == 3


def test_server_down_then_up(tiny):
    port = free_port()
    app = create_app(tiny[0], ServerSettings(model_id="tiny", api_keys_env="FEDPROMPT_TEST_NO_KEYS"), tokenizer=tiny[1])
    server = RunningServer(app, port=port)
    starter = threading.Timer(1.0, server.start)
    starter.start()
    try:
        with HttpBlackBox(f"http://127.0.0.1:{port}", retries=10, backoff_s=0.2, max_backoff_s=1.0) as client:
            result = client.classify(TEXTS[:2], [" p", " ne"])
        np.testing.assert_allclose(result.logprobs, score_label_words(*tiny, TEXTS[:2], [" p", " ne"]), atol=1e-5)
    finally:
        starter.join()
        server.stop()


# ---- factory ---------------------------------------------------------------------------------------

def test_make_blackbox_follows_service_kind(tiny, tiny_model_dir, server):
    cfg = compose([f"model={tiny_model_dir}", "model.dtype=float32", f"service.url={server.url}",
                   "service.openai.model=tiny"])
    local = make_blackbox(cfg, model=tiny[0], tokenizer=tiny[1])
    assert isinstance(local, InProcessBlackBox)
    np.testing.assert_array_equal(local.classify(TEXTS, MULTI).logprobs, score_label_words(*tiny, TEXTS, MULTI))
    with make_blackbox(cfg, "http") as remote:
        assert isinstance(remote, HttpBlackBox) and remote.classify(TEXTS[:2], MULTI).usage.queries == 2
    with make_blackbox(compose([*cfg_overrides(tiny_model_dir, server), "service.kind=openai",
                                "service.openai.label_mode=echo"])) as openai:
        assert isinstance(openai, OpenAICompatibleBlackBox) and openai.model == "tiny"
    loaded = make_blackbox(compose([f"model={tiny_model_dir}", "model.device=cpu"]))
    assert isinstance(loaded, InProcessBlackBox) and loaded.model_id == str(tiny_model_dir)


def cfg_overrides(model_dir, server):
    return [f"model={model_dir}", f"service.url={server.url}", "service.openai.model=tiny"]


def test_bad_client_settings_fail_fast(tiny_model_dir):
    from fedprompt.errors import ConfigError

    with pytest.raises(ConfigError, match="service.kind"):
        make_blackbox(compose([f"model={tiny_model_dir}", "service.kind=carrier-pigeon"]))
    with pytest.raises(ConfigError, match="label_mode"):
        make_blackbox(compose([f"model={tiny_model_dir}", "service.kind=openai", "service.openai.label_mode=guess"]))


def test_helpers():
    assert normalize_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalize_base_url("https://api.example.com/v1/") == "https://api.example.com/v1"
    assert normalize_base_url("http://h/openai/v1") == "http://h/openai/v1"
    top = {"a": np.log(0.5), "b": np.log(0.3)}
    assert label_floor(top) == pytest.approx(np.log(0.2))  # below the 2nd best, and the mass left
    assert label_floor({"a": np.log(0.9), "b": np.log(0.01)}) == pytest.approx(np.log(0.01))
