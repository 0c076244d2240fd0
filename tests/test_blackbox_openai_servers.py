"""Any OpenAI-compatible server (issue 26): a stub with llama-cpp-python's rule (one prompt per request,
HTTP 500 for more), ``fedprompt eval`` through it, the one-prompt fallback learned once, echo mode, errors
that name URL, status and body, float32 label scores and the tie rule."""

from __future__ import annotations

import json
import logging
import threading
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from fedprompt import cli
from fedprompt.blackbox import OpenAICompatibleBlackBox, ServiceUnavailable, make_blackbox
from fedprompt.blackbox.engine import CompletionJob, ScoringEngine
from fedprompt.blackbox.errors import InvalidRequest, error_from_response
from fedprompt.blackbox.http_client import HttpBlackBox
from fedprompt.blackbox.openai_format import completion_body
from fedprompt.blackbox.runner import RunningServer
from fedprompt.blackbox.settings import Limits
from fedprompt.blackbox.transport import join_url
from fedprompt.config import compose
from fedprompt.errors import ConfigError
from fedprompt.models import PromptedClassifier, load_causal_lm, load_tokenizer, score_label_words
from fedprompt.ties import pick_labels, tie_key
from tests.blackbox_support import TEXTS

MULTI = [" positive", " negative", " yes"]
# What llama-cpp-python's server answers to a list of two or more prompts: `assert len(body.prompt) <= 1`
# fails, and its route handler wraps the (empty) AssertionError message as an internal server error.
LLAMA_CPP_500 = {"error": {"message": "", "type": "internal_server_error", "param": None, "code": None}}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), "cpu", "float32"), load_tokenizer(str(tiny_model_dir))


class OnePromptServer:
    """An OpenAI-compatible /v1/completions that takes one prompt per request (a string, or a list of at
    most one) like llama-cpp-python's, and answers from fedprompt's engine on the tiny model (so its
    log-probs are the in-process ones), or with ``fixed_top`` as every top-k when set."""

    def __init__(self, model, tokenizer, fixed_top: dict[str, float] | None = None) -> None:
        self.engine = ScoringEngine(model, tokenizer, Limits(max_batch=64), model_id="tiny")
        self.fixed_top = fixed_top
        self.prompts_per_request: list[int] = []  # every request received, refused ones included
        self._lock = threading.Lock()
        self.app = FastAPI()
        self.app.post("/v1/completions")(self.completions)

    def completions(self, body: dict):
        prompt = body["prompt"]
        with self._lock:
            self.prompts_per_request.append(len(prompt) if isinstance(prompt, list) else 1)
        if isinstance(prompt, list):
            if len(prompt) > 1:
                return JSONResponse(LLAMA_CPP_500, status_code=500)
            prompt = prompt[0] if prompt else ""
        echo, top_k = bool(body.get("echo")), int(body.get("logprobs") or 0)
        if self.fixed_top is not None:
            logprobs = {"tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [dict(self.fixed_top)],
                        "text_offset": [len(prompt)]}
            return {"object": "text_completion", "model": "tiny", "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                    "choices": [{"index": 0, "text": "x", "logprobs": logprobs, "finish_reason": "length"}]}
        plans = self.engine.plan_prompts([prompt], int(body.get("max_tokens", 16)), echo)
        comps = self.engine.complete_group([CompletionJob(plans, int(body.get("max_tokens", 16)), top_k, echo)])[0]
        return completion_body(self.engine, plans, comps, echo, body.get("logprobs") is not None)


@contextmanager
def one_prompt_server(model, tokenizer, **options):
    stub = OnePromptServer(model, tokenizer, **options)
    with RunningServer(stub.app) as server:
        stub.url = server.url
        yield stub


@pytest.fixture(scope="module")
def stub(tiny):
    with one_prompt_server(*tiny) as server:
        yield server


# ---- the one-prompt fallback ----------------------------------------------------------------------

def test_fallback_to_one_prompt_happens_once_and_is_remembered(tiny, caplog):
    sleeps = []
    with one_prompt_server(*tiny) as server, caplog.at_level(logging.WARNING, logger="fedprompt.blackbox"):
        with OpenAICompatibleBlackBox(server.url, "tiny", chunk_size=4, sleep=sleeps.append) as client:
            first = client.classify(TEXTS[:6], [" p", " ne"])
            assert server.prompts_per_request == [4] + [1] * 6  # the probe of 4 was refused, then one by one
            second = client.classify(TEXTS[:3], [" p", " ne"])
            assert server.prompts_per_request[7:] == [1] * 3  # remembered: no new probe
            assert client.max_prompts == 1
        # A new client for the same server and model (a new round, a new method) starts where this one left.
        with OpenAICompatibleBlackBox(server.url + "/v1/", "tiny", chunk_size=4) as again:
            again.classify(TEXTS[:2], [" p", " ne"])
        assert server.prompts_per_request[10:] == [1, 1]
    assert sleeps == []  # the refused probe was not retried with backoff
    notes = [r.getMessage() for r in caplog.records if "prompt(s) per request" in r.getMessage()]
    assert len(notes) == 1, notes
    assert server.url + "/v1" in notes[0] and "HTTP 500" in notes[0] and "max_prompts_per_request=1" in notes[0]
    # Answered requests and queries are counted; the refused probe is not an answer.
    assert first.usage.requests == 6 and first.usage.queries == 6 and second.usage.requests == 3
    truth = score_label_words(*tiny, TEXTS[:6], [" p", " ne"])  # where a label is in the top-20, its exact score
    np.testing.assert_allclose(first.logprobs[~first.floored], truth[~first.floored], atol=1e-5)


def test_configured_limit_skips_the_probe(tiny, tiny_model_dir):
    with one_prompt_server(*tiny) as server:
        cfg = compose([f"model={tiny_model_dir}", "service.kind=openai", f"service.url={server.url}",
                       "service.openai.model=tiny", "service.client.max_prompts_per_request=1"])
        with make_blackbox(cfg) as client:
            assert client.max_prompts == 1
            client.classify(TEXTS[:3], [" p", " ne"])
        assert server.prompts_per_request == [1, 1, 1]
    with pytest.raises(ConfigError, match="max_prompts_per_request"):
        make_blackbox(compose([f"model={tiny_model_dir}", "service.kind=openai",
                               "service.client.max_prompts_per_request=0"]))


def test_a_server_that_takes_lists_is_sent_lists(tiny):
    """fedprompt serve takes several prompts a request: the probe succeeds and nothing is learned."""
    from tests.blackbox_support import serving

    with serving(*tiny, limits=Limits(max_batch=8, max_prompt_tokens=64)) as server:
        with OpenAICompatibleBlackBox(server.url, "tiny", chunk_size=4) as client:
            result = client.classify(TEXTS, [" p", " ne"])
            assert client.max_prompts is None and not client._probing
    assert result.usage.requests == 2 and result.usage.queries == len(TEXTS)


def _choices(n: int) -> dict:
    top = {" p": -0.5, " n": -1.5}
    return {"choices": [{"index": i, "text": "x", "logprobs": {"top_logprobs": [top]}} for i in range(n)],
            "usage": {"prompt_tokens": n, "completion_tokens": n}}


def test_what_counts_as_a_refusal_of_several_prompts():
    """A server that answers a list with one choice is refused like a 500; a 503 with Retry-After is load,
    retried even for a probe; a connection failure is no answer at all: neither teaches anything."""
    sent = []

    def first_only(request):  # reads only the first prompt of a list (some servers do)
        body = json.loads(request.content)
        sent.append(len(body["prompt"]) if isinstance(body["prompt"], list) else 1)
        return httpx.Response(200, json=_choices(1))

    with OpenAICompatibleBlackBox("http://first-only:1", "m", transport=httpx.MockTransport(first_only)) as client:
        result = client.classify(["a", "b", "c"], [" p", " n"])
    assert sent == [3, 1, 1, 1] and client.max_prompts == 1 and result.predictions == [0, 0, 0]

    answers = iter([httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {"message": "busy"}})])
    sent.clear()

    def busy_once(request):
        body = json.loads(request.content)
        sent.append(len(body["prompt"]) if isinstance(body["prompt"], list) else 1)
        return next(answers, None) or httpx.Response(200, json=_choices(sent[-1]))

    sleeps = []
    with OpenAICompatibleBlackBox("http://busy:1", "m", transport=httpx.MockTransport(busy_once),
                                  sleep=sleeps.append) as client:
        client.classify(["a", "b"], [" p", " n"])
        assert client.max_prompts is None and not client._probing  # several prompts a request work there
    assert sent == [2, 2] and len(sleeps) == 1

    sent.clear()

    def down(request):
        sent.append(1)
        raise httpx.ConnectError("connection refused", request=request)

    with OpenAICompatibleBlackBox("http://down:1", "m", transport=httpx.MockTransport(down), retries=2,
                                  sleep=lambda s: None) as client:
        with pytest.raises(ServiceUnavailable, match="Nothing answered at http://down:1/v1"):
            client.classify(["a", "b"], [" p", " n"])
        assert client.max_prompts is None
    assert len(sent) == 3  # one request with its retries; no single-prompt attempt after it


# ---- echo mode ------------------------------------------------------------------------------------

def test_echo_mode_works_with_a_one_prompt_server(tiny):
    truth = score_label_words(*tiny, TEXTS, MULTI)
    with one_prompt_server(*tiny) as server:
        with OpenAICompatibleBlackBox(server.url, "tiny", label_mode="echo", chunk_size=6) as client:
            result = client.classify(TEXTS, MULTI)
        # One probe of 6 (text, label) prompts, refused; then one prompt per (text, label).
        assert server.prompts_per_request == [6] + [1] * (len(TEXTS) * len(MULTI))
    np.testing.assert_allclose(result.logprobs, truth, atol=1e-5)
    assert result.usage.requests == len(TEXTS) * len(MULTI) and result.usage.queries == len(TEXTS) * len(MULTI)


# ---- fedprompt eval through the service ----------------------------------------------------------

def _toy(tiny_data, tiny_model_dir):
    """The toy task's spec and test examples, as `fedprompt eval` builds them."""
    cfg = compose(["task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}"])
    task = cli.load_task_checked(cfg)
    return task.spec.with_chat_format(cfg.model.get("chat_format")), task.split("test")


def test_eval_through_an_openai_server_sends_its_requests_there(capsys, monkeypatch, tiny, tiny_model_dir, tiny_data,
                                                               tmp_path):
    model, tok = tiny
    spec, examples = _toy(tiny_data, tiny_model_dir)
    local = PromptedClassifier(model, tok, spec).evaluate(examples, calibrate=True)

    def refuse(*args, **kwargs):
        raise AssertionError("fedprompt eval loaded a model although service.kind=openai")

    monkeypatch.setattr("fedprompt.models.load_causal_lm", refuse)
    with one_prompt_server(model, tok) as server:
        code = cli.main(["eval", "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "service.kind=openai",
                         f"service.url={server.url}", "service.openai.model=tiny", "service.openai.label_mode=echo",
                         "calibrate=true", "task.calibration=none", "progress=false", f"output_dir={tmp_path / 'run'}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        sent = list(server.prompts_per_request)
    record = json.loads(out.strip().splitlines()[-1])
    n_prompts = len(examples) * len(spec.label_words)
    assert record["service"] == "openai" and record["url"] == server.url + "/v1" and record["model"] == "tiny"
    assert f"through service.kind=openai at {server.url}/v1" in err
    assert sent[0] > 1 and sent[1:] == [1] * n_prompts  # every prompt went to the server, one a request
    assert record["usage"]["requests"] == n_prompts and record["usage"]["queries"] == n_prompts
    # The server computes what the in-process scorer computes: the same accuracy, calibrated too.
    assert record["n"] == local.n == len(examples)
    assert record["accuracy"] == local.accuracy and record["calibrated_accuracy"] == local.calibrated_accuracy
    assert record["ties"] == local.ties == 0 and record["floored_rows"] == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == record


def test_eval_counts_ties_and_does_not_give_them_all_to_the_first_label(capsys, tiny, tiny_model_dir, tiny_data,
                                                                       tmp_path):
    """A server whose top-k gives both label words the same log-prob: every row is a tie, counted, and
    broken per example (not all toward the first label)."""
    spec, examples = _toy(tiny_data, tiny_model_dir)
    top = {word: -0.7 for word in spec.label_words}
    with one_prompt_server(*tiny, fixed_top=top) as server:
        code = cli.main(["eval", "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "service.kind=openai",
                         f"service.url={server.url}", "service.openai.model=tiny", "progress=false",
                         "service.client.max_prompts_per_request=1", "task.calibration=none",
                         f"output_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out.strip().splitlines()[-1])
    assert record["ties"] == record["n"] == 12
    inputs = [spec.format(e) for e in examples]
    picks, ties = pick_labels(np.full((len(inputs), 2), -0.7, np.float32), inputs)
    assert ties == 12 and 0 < picks.sum() < 12  # both labels get some of the tied rows
    assert record["accuracy"] == pytest.approx(float((picks == [e.label for e in examples]).mean()))


def test_eval_through_http_names_the_service(capsys, tiny, tiny_model_dir, tiny_data, tmp_path):
    from tests.blackbox_support import serving

    with serving(*tiny, limits=Limits(max_batch=128, max_prompt_tokens=128)) as server:
        url = server.url
        code = cli.main(["eval", "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "service.kind=http",
                         f"service.url={url}/", "progress=false", "task.calibration=none", f"output_dir={tmp_path / 'run'}"])
        out, err = capsys.readouterr()
        assert code == 0, err
        # The fallback's default calibration: its training rows go through the same server, first.
        code = cli.main(["eval", "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "service.kind=http",
                         f"service.url={url}/", "progress=false", f"output_dir={tmp_path / 'calibrated'}"])
        calibrated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0
    record = json.loads(out.strip().splitlines()[-1])
    assert record["service"] == "http" and record["url"] == url and record["model"] == "tiny"
    assert record["usage"]["requests"] == 1 and record["usage"]["queries"] == 12 and record["dtype"] is None
    assert calibrated["usage"]["queries"] == 12 + 12 and calibrated["calibration"]["examples"] == 12
    assert calibrated["uncalibrated_accuracy"] == record["accuracy"]
    local = cli.main(["eval", "task=toy", f"data_dir={tiny_data}", f"model={tiny_model_dir}", "progress=false",
                      f"output_dir={tmp_path / 'local'}"])
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if local == 0 else None
    assert local["accuracy"] == calibrated["accuracy"]  # in-process and through the server: the same calibration
    assert local["calibration"]["bias"] == pytest.approx(calibrated["calibration"]["bias"], abs=1e-3)


# ---- errors ---------------------------------------------------------------------------------------

def _answering(status: int, body, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handler)


def test_errors_name_url_status_and_body():
    calls = []
    long_body = "Traceback: " + "x" * 1000
    transport = _answering(500, long_body, calls)
    with OpenAICompatibleBlackBox("http://gpu-box:8001/v1/", "m", transport=transport, retries=1,
                                  max_prompts_per_request=1, sleep=lambda s: None) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            client.classify(["a"], [" p", " n"])
    message = caught.value.message
    assert calls == ["http://gpu-box:8001/v1/completions"] * 2  # no "//": the path is joined properly
    assert "POST http://gpu-box:8001/v1/completions failed after 2 attempts" in message
    assert "HTTP 500: Traceback: xxx" in message and "x" * 301 not in message  # the body, cut to ~300 chars
    assert "fedprompt serve" not in message and "//completions" not in message
    assert caught.value.status == 500

    calls.clear()
    transport = _answering(400, {"error": {"message": "logprobs must be <= 5", "type": "invalid_request_error"}}, calls)
    with OpenAICompatibleBlackBox("https://api.example.com/v1", "m", transport=transport) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.classify(["a"], [" p", " n"])
    assert caught.value.message == ("logprobs must be <= 5 (HTTP 400 from POST https://api.example.com/v1/completions)")
    assert len(calls) == 1  # a 400 to one prompt: no probe, no retry


def test_a_refused_probe_whose_single_prompt_fails_too_shows_that_error():
    """A server that answers 500 to everything: the fallback learns nothing and the error is the single
    prompt's, with the empty-message body quoted as it came."""
    calls = []
    with OpenAICompatibleBlackBox("http://llama:8000", "m", transport=_answering(500, LLAMA_CPP_500, calls),
                                  retries=2, sleep=lambda s: None) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            client.classify(["a", "b"], [" p", " n"])
        assert client.max_prompts is None
    assert len(calls) == 1 + 3  # the probe (not retried), then the single prompt with its retries
    assert "internal_server_error" in caught.value.message and "HTTP 500" in caught.value.message
    assert "http://llama:8000/v1/completions" in caught.value.message
    assert "fedprompt serve" not in caught.value.message


def test_only_fedprompts_default_url_suggests_fedprompt_serve():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    for url, hint in (("http://127.0.0.1:8000", True), ("http://10.0.0.5:8000", False)):
        with HttpBlackBox(url, transport=httpx.MockTransport(refuse), retries=0, sleep=lambda s: None) as client:
            with pytest.raises(ServiceUnavailable) as caught:
                client.classify(["a"], [" p"])
        assert f"POST {url}/v1/classify failed after 1 attempts" in caught.value.message
        assert ("fedprompt serve" in caught.value.message) == hint


def test_error_helpers():
    assert join_url("http://h:8000/v1/", "/completions") == "http://h:8000/v1/completions"
    assert join_url("http://h:8000", "v1/classify") == "http://h:8000/v1/classify"
    err = error_from_response(500, LLAMA_CPP_500, where="POST http://h/v1/completions")
    assert err.status == 500 and "internal_server_error" in err.message and err.message.endswith(
        "(HTTP 500 from POST http://h/v1/completions)")
    assert "..." in error_from_response(502, "y" * 400).message


# ---- precision and ties ---------------------------------------------------------------------------

def test_bf16_label_scores_are_computed_in_float32(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), "cpu", "bfloat16")
    tok = load_tokenizer(str(tiny_model_dir))
    labels = [" p", " ne"]  # single tokens: one position scores both
    scores = score_label_words(model, tok, TEXTS, labels, batch_size=1)  # unpadded rows, as below
    ids = [tok(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    want, bf16 = [], []
    with torch.no_grad():
        for text in TEXTS:
            hidden = model.model(torch.tensor([tok(text)["input_ids"]])).last_hidden_state[0, -1]
            want.append(torch.log_softmax(hidden.float() @ model.lm_head.weight.float().T, -1)[ids])
            bf16.append(torch.log_softmax(model.lm_head(hidden).float(), -1)[ids])
    np.testing.assert_allclose(scores, torch.stack(want).numpy(), atol=1e-5)
    # The bf16 head's logits are rounded to 8 significant bits: clearly not what the scorer returns.
    assert np.abs(scores - torch.stack(bf16).numpy()).max() > 1e-4
    assert model.lm_head.__dict__.get("forward") is None  # the float32 head is undone after scoring


def test_tie_rule():
    scores = np.array([[-1.0, -1.0, -3.0], [-2.0, -0.5, -0.5], [-0.1, -2.0, -3.0], [0.0, 0.0, 0.0]], np.float32)
    texts = ["a", "b", "c", "d"]
    picks, ties = pick_labels(scores, texts)
    assert ties == 3 and picks[2] == 0
    assert picks[0] == [0, 1][tie_key("a") % 2] and picks[1] == [1, 2][tie_key("b") % 2]
    assert picks[3] == tie_key("d") % 3
    assert pick_labels(scores, texts)[0].tolist() == picks.tolist()  # deterministic
    # Over many tied rows, each label gets about half: no label is favoured.
    many = [f"example {i}" for i in range(1000)]
    share = pick_labels(np.zeros((1000, 2), np.float32), many)[0].mean()
    assert 0.45 < share < 0.55
    assert pick_labels(np.zeros((0, 2)), [])[1] == 0
