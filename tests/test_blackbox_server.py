"""The service over real HTTP on 127.0.0.1: protocol, agreement with scoring, auth, budgets, limits, errors."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from fedprompt.blackbox import BudgetExhausted, HttpBlackBox, Limits
from fedprompt.blackbox.batching import DynamicBatcher
from fedprompt.blackbox.engine import ScoringEngine
from fedprompt.models import load_causal_lm, load_tokenizer, score_label_words
from tests.blackbox_support import KEYS, TEXTS, auth, serving, write_keys

LIMITS = Limits(max_batch=16, max_labels=4, max_prompt_tokens=64, max_label_tokens=8, max_new_tokens=8,
                max_request_bytes=20_000)
SINGLE = [" p", " ne"]                   # one token each with the tiny tokenizer
MULTI = [" positive", " negative", " yes"]  # several tokens each


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with serving(*tiny, write_keys(tmp_path_factory.mktemp("keys")), LIMITS, wait_ms=2.0) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=auth("alice"), timeout=60) as client:
        yield client


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def test_health_is_open_and_models_need_a_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "missing API key" in _error(httpx.get(server.url + "/v1/models"), 401)
    models = httpx.get(server.url + "/v1/models", headers=auth("alice")).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


@pytest.mark.parametrize("labels", [SINGLE, MULTI], ids=["single-token", "multi-token"])
def test_classify_agrees_with_score_label_words(http, tiny, labels):
    truth = score_label_words(*tiny, TEXTS, labels)
    body = http.post("/v1/classify", json={"texts": TEXTS, "labels": labels}).json()
    np.testing.assert_allclose(np.array(body["logprobs"], np.float32), truth, rtol=0, atol=1e-5)
    assert body["predictions"] == truth.argmax(1).tolist()
    assert body["usage"]["queries"] == len(TEXTS)
    only = http.post("/v1/classify", json={"texts": TEXTS, "labels": labels, "labels_only": True}).json()
    assert only["logprobs"] is None and only["predictions"] == body["predictions"]


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic abc", "Bearer"])
def test_bad_or_missing_key_is_401(server, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.post(server.url + "/v1/classify", json={"texts": ["a"], "labels": SINGLE}, headers=headers)
    message = _error(response, 401)
    assert "key" in message.lower() or "authorization" in message.lower()
    assert response.headers["www-authenticate"] == "Bearer"


def test_budget_exhausted_is_a_clear_429_without_retry_after(server):
    with HttpBlackBox(server.url, KEYS["bob"], retries=3, backoff_s=0) as bob:
        bob.classify(TEXTS[:3], SINGLE)
        with pytest.raises(BudgetExhausted, match=r"budget exhausted for API key 'bob': queries used 3 of 5"):
            bob.classify(TEXTS[:3], SINGLE)
        assert bob.usage.requests == 1  # the refused call is not charged
        report = bob.server_usage()
    assert report["usage"]["queries"] == 3 and report["remaining"]["queries"] == 2 and report["usage"]["rejected"] == 1
    response = httpx.post(server.url + "/v1/classify", json={"texts": TEXTS[:3], "labels": SINGLE}, headers=auth("bob"))
    assert _error(response, 429).startswith("budget exhausted") and "retry-after" not in response.headers
    assert response.json()["error"]["code"] == "insufficient_quota"


def test_usage_of_every_key_needs_an_admin_key(server):
    _error(httpx.get(server.url + "/v1/usage?all=true", headers=auth("alice")), 403)
    names = {k["key"] for k in httpx.get(server.url + "/v1/usage?all=true", headers=auth("root")).json()["keys"]}
    assert names == {"alice", "bob", "root"}


@pytest.mark.parametrize("body, status, words", [
    ({"texts": ["a"] * 17, "labels": SINGLE}, 413, "17 texts"),
    ({"texts": ["word " * 80], "labels": SINGLE}, 413, "max_prompt_tokens"),
    ({"texts": ["a"], "labels": [" a", " b", " c", " d", " e"]}, 413, "max_labels"),
    ({"texts": ["a"], "labels": [" " + "x" * 40, " p"]}, 413, "max_label_tokens"),
    ({"texts": ["a" * 30_000], "labels": SINGLE}, 413, "max_request_bytes"),
])
def test_oversize_requests_are_413(http, body, status, words):
    assert words in _error(http.post("/v1/classify", json=body), status)


@pytest.mark.parametrize("content, status, words", [
    (b'{"texts": ["a"], "labels": [" p"]', 400, "malformed JSON"),
    (b"", 400, "malformed JSON"),
    (b'{"texts": ["\\ud800"], "labels": [" p"]}', 400, "malformed JSON"),
    (b"[1, 2]", 422, "should be an object"),
    (b'{"texts": "a great movie", "labels": [" p"]}', 422, "texts"),
    (b'{"texts": ["a", 3], "labels": [" p"]}', 422, "texts.1"),
    (b'{"texts": ["a"], "labels": [" p"], "labels_only": "yes"}', 422, "labels_only"),
    (b'{"texts": ["a"], "labels": [" p"], "verbose": true}', 422, "unknown field 'verbose'"),
    (b'{"texts": ["a"]}', 422, "labels: Field required"),
    (b'{"texts": [], "labels": [" p"]}', 422, "texts is empty"),
    (b'{"texts": ["a"], "labels": [" p", " p"]}', 422, "distinct"),
    (b'{"texts": ["a"], "labels": [""]}', 422, "tokenizes to nothing"),
    (b'{"texts": [""], "labels": [" p"]}', 422, "empty after tokenization"),
    (b'{"texts": ["a"], "labels": [" p"], "model": "gpt-9"}', 404, "not served here"),
])
def test_malformed_requests_get_clear_4xx(http, content, status, words):
    assert words in _error(http.post("/v1/classify", content=content), status)


def test_unknown_paths_and_methods_are_json_4xx(http):
    assert "endpoints:" in _error(http.get("/v1/nothing"), 404)
    _error(http.get("/v1/classify"), 405)


def test_completions_greedy_matches_generate_and_logprobs_match_softmax(http, tiny):
    model, tok = tiny
    prompt = "a great movie"
    body = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 5}).json()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        first = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    eos = tok.eos_token_id
    expected = generated[: generated.index(eos)] if eos in generated else generated
    choice = body["choices"][0]
    assert choice["text"] == tok.decode(expected)
    top = choice["logprobs"]["top_logprobs"][0]
    values, indices = torch.topk(first, 5)
    expected_top: dict[str, float] = {}
    for value, index in zip(values.tolist(), indices.tolist()):
        expected_top.setdefault(tok.decode([index]), value)  # ids that decode alike: the likelier is kept
    assert top.keys() == expected_top.keys()
    np.testing.assert_allclose([top[k] for k in expected_top], list(expected_top.values()), atol=1e-5)
    assert body["usage"] == {"prompt_tokens": ids.shape[1], "completion_tokens": len(expected),
                             "total_tokens": ids.shape[1] + len(expected)}


def test_completions_echo_gives_prompt_logprobs(http, tiny):
    model, tok = tiny
    text = "a great movie"
    body = http.post("/v1/completions", json={"prompt": [text], "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    lp = body["choices"][0]["logprobs"]
    ids = tok(text)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert lp["token_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)], atol=1e-5)
    assert body["choices"][0]["text"] == text and lp["text_offset"][0] == 0


@pytest.mark.parametrize("extra, words", [
    ({"temperature": 0.7}, "temperature must be 0"),
    ({"logprobs": 21}, "at most 20"),
    ({"max_tokens": 9}, "max_new_tokens"),
    ({"n": 2}, "n and best_of"),
    ({"stream": True}, "stream"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_completions_refuse_unsupported_options(http, extra, words):
    body = json.dumps({"prompt": "a great movie", "max_tokens": 1, **extra}).encode()
    response = http.post("/v1/completions", content=body)
    assert response.status_code in (400, 422) and words in response.json()["error"]["message"]


def test_chat_completions_render_and_answer(http):
    body = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "who wrote hamlet ?"}],
                                                   "max_tokens": 3, "logprobs": True, "top_logprobs": 2}).json()
    choice = body["choices"][0]
    plain = http.post("/v1/completions", json={"prompt": "user: who wrote hamlet ?\nassistant:", "max_tokens": 3}).json()
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"] == plain["choices"][0]["text"]
    assert all(len(t["top_logprobs"]) == 2 for t in choice["logprobs"]["content"])
    _error(http.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}), 422)


def test_concurrent_clients_get_what_sequential_calls_get(server, tiny):
    labels = SINGLE
    shards = [TEXTS[i:] + TEXTS[:i] for i in range(8)]
    with HttpBlackBox(server.url, KEYS["alice"]) as client:
        sequential = [client.classify(shard, labels).logprobs for shard in shards]
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(len(shards))

    def run(i: int) -> None:
        with HttpBlackBox(server.url, KEYS["alice"]) as own:
            barrier.wait()
            results[i] = own.classify(shards[i], labels).logprobs

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(sequential):
        np.testing.assert_allclose(results[i], expected, atol=1e-5)
        assert (results[i].argmax(1) == expected.argmax(1)).all()


def test_batcher_merges_requests_that_queue_while_the_model_is_busy(tiny):
    engine = ScoringEngine(*tiny, batch_size=16)
    batcher = DynamicBatcher(engine, max_texts=256, wait_ms=1)
    try:
        with engine._lock:  # the worker takes the first job, then blocks on the model
            first = batcher.submit_classify(TEXTS[:2], tuple(SINGLE))
            while not first.running():  # past collecting: what comes now must wait for the next round
                time.sleep(0.001)
            rest = [batcher.submit_classify([t], tuple(SINGLE)) for t in TEXTS[2:6]]
            other = batcher.submit_classify(TEXTS[:1], tuple(MULTI))
        results = [f.result(timeout=60) for f in [first, *rest, other]]
    finally:
        batcher.close()
    assert engine.forward_calls == 3  # the first job; the four queued ones together; the other label set
    assert batcher.merged_calls == 2
    truth = score_label_words(*tiny, TEXTS[:6], SINGLE)
    np.testing.assert_allclose(np.concatenate(results[:5]), truth, atol=1e-5)
    assert batcher.pending == 0


def test_time_limit_and_queue_limit_answer_with_retry_after(tiny):
    limits = Limits(request_timeout_s=0.05, max_queue=4)
    with serving(*tiny, limits=limits, wait_ms=300.0) as srv:  # the worker waits 300 ms: the 50 ms limit hits first
        response = httpx.post(srv.url + "/v1/classify", json={"texts": TEXTS[:1], "labels": SINGLE})
        assert "did not finish within 0.05 s" in _error(response, 503) and response.headers["retry-after"]
        assert httpx.get(srv.url + "/v1/usage").json()["usage"]["queries"] == 0  # the reservation was released

    with serving(*tiny, limits=Limits(max_queue=4)) as srv:
        engine = srv.app.state.engine
        with engine._lock:  # the model is busy: the first request stays queued
            first = threading.Thread(target=httpx.post, args=(srv.url + "/v1/classify",),
                                     kwargs={"json": {"texts": TEXTS[:3], "labels": SINGLE}, "timeout": 60})
            first.start()
            while httpx.get(srv.url + "/health").json()["queued_texts"] < 3:
                time.sleep(0.01)
            response = httpx.post(srv.url + "/v1/classify", json={"texts": TEXTS[:3], "labels": SINGLE})
            assert "server busy" in _error(response, 429) and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
        first.join()


def test_app_works_without_its_lifespan(tiny):
    import asyncio

    from fedprompt.blackbox import ServerSettings, create_app

    app = create_app(tiny[0], ServerSettings(model_id="tiny", api_keys_env="FEDPROMPT_TEST_NO_KEYS"), tokenizer=tiny[1])

    async def call():  # ASGITransport does not run the lifespan: the batcher must start on first use
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return (await client.post("/v1/classify", json={"texts": TEXTS[:2], "labels": SINGLE})).json()

    body = asyncio.run(call())
    np.testing.assert_allclose(body["logprobs"], score_label_words(*tiny, TEXTS[:2], SINGLE), atol=1e-5)
