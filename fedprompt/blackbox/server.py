"""The black-box LLM service: a FastAPI app over a :class:`ScoringEngine` and a :class:`DynamicBatcher`.

Endpoints (docs/blackbox.md has the JSON): ``POST /v1/classify`` (batch label scoring),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI protocol, greedy), ``GET /v1/models``,
``GET /v1/usage``, ``GET /health``. Every client mistake is answered with a 4xx JSON error
``{"error": {"message", "type", "param", "code"}}``; a 5xx means a bug, a request that ran past
``request_timeout_s`` or a server shutting down.

:mod:`fedprompt.blackbox.guard` checks the key and reads the body (within its limits) before any handler
runs. A request whose time runs out, or whose client disconnects, has its model work stopped at the next
batch boundary and its reservation released (docs/blackbox.md, "Limits and abuse").
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import threading
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedprompt.blackbox.accounting import Account, Accountant
from fedprompt.blackbox.base import Usage
from fedprompt.blackbox.batching import DynamicBatcher, JobFuture
from fedprompt.blackbox.engine import CompletionJob, ScoringEngine
from fedprompt.blackbox.errors import BlackBoxError, ClientGone, Forbidden, InvalidRequest, NotFound, RequestTimedOut
from fedprompt.blackbox.guard import Gate
from fedprompt.blackbox.openai_format import chat_body, completion_body
from fedprompt.blackbox.protocol import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    check_sampling,
    classify_response,
    encode_json,
    parse_request,
    stop_strings,
)
from fedprompt.blackbox.settings import ServerSettings

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def rss_mb() -> float | None:
    try:
        import psutil  # installed with accelerate

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return None


def create_app(model, settings: ServerSettings = ServerSettings(), *, tokenizer=None, device: str | None = "auto",
               dtype: str | None = "auto", accountant: Accountant | None = None) -> FastAPI:
    """The service app for ``model``: a :class:`ScoringEngine`, a loaded model (with ``tokenizer``), or a
    registry name / HF id / folder (loaded here on ``device`` in ``dtype``)."""
    engine = model if isinstance(model, ScoringEngine) else _engine(model, tokenizer, settings, device, dtype)
    accountant = accountant or Accountant.from_settings(settings.api_keys_file, settings.api_keys_env, settings.budget)
    limits = settings.limits
    started = time.time()
    current: DynamicBatcher | None = None

    def batcher() -> DynamicBatcher:
        # Created on first use too, so that an app driven without its lifespan (a bare TestClient) works.
        nonlocal current
        if current is None:
            current = DynamicBatcher(engine, settings.max_texts, settings.wait_ms, limits.max_queue)
        return current

    def begin_shutdown() -> None:
        # Called as soon as the server is told to stop: waiting requests are answered "shutting down" and
        # the model stops at its next batch boundary, so shutdown never waits for the queue.
        if current is not None:
            current.begin_close()

    @asynccontextmanager
    async def lifespan(app):
        nonlocal current
        running = batcher()
        try:
            yield
        finally:
            app.state.worker_stopped = await run_in_threadpool(running.close)
            current = None

    app = FastAPI(title="fedprompt black-box LLM service", version="1", lifespan=lifespan)
    app.add_middleware(Gate, accountant=accountant, limits=limits)
    app.state.engine, app.state.accountant, app.state.limits = engine, accountant, limits
    app.state.begin_shutdown, app.state.worker_stopped = begin_shutdown, None

    async def authenticate(request: Request) -> Account:
        account = getattr(request.state, "account", None)  # the Gate checked the key before the body
        if account is None:
            account = request.state.account = accountant.authenticate(request.headers.get("authorization"))
        return account

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_id:
            raise NotFound(f"model {name!r} is not served here; this server serves {engine.model_id!r} (GET /v1/models)",
                           param="model", code="model_not_found")

    async def run_job(request: Request, future: JobFuture, account: Account, reserved: Usage):
        """The job's result; past ``request_timeout_s`` or when the client leaves, the job is stopped (the
        model drops it at its next batch boundary) and its reservation released: the key is not charged."""
        answer = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({answer, gone}, timeout=limits.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the server's shutdown grace ran out)
            future.stop()
            accountant.release(account, reserved)
            raise
        finally:
            gone.cancel()
        if answer in done:
            try:
                return answer.result()
            except BaseException:
                accountant.release(account, reserved)
                raise
        future.stop()
        answer.cancel()
        accountant.release(account, reserved)
        if gone in done:
            raise ClientGone("the client closed the connection; its work was stopped")
        raise RequestTimedOut(f"the request did not finish within {limits.request_timeout_s:g} s "
                              "(service.limits.request_timeout_s); its work was stopped and not charged: send fewer "
                              "texts or tokens per request", retry_after=5.0)

    def respond(request: Request, body: dict, account: Account, reserved: Usage, actual: Usage) -> Response:
        content = encode_json(body)
        actual.bytes_sent = getattr(request.state, "body_bytes", 0)  # as the key's client counts them
        actual.bytes_received = len(content)
        accountant.settle(account, reserved, actual)
        return Response(content, media_type="application/json")

    @app.exception_handler(BlackBoxError)
    async def _blackbox_error(request: Request, err: BlackBoxError):
        account = getattr(request.state, "account", None)
        if account is not None:
            accountant.reject(account)
        headers = {}
        if err.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(round(err.retry_after))))
        if err.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return Response(encode_json(err.to_json()), status_code=err.status, media_type="application/json", headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        message = f"{err.detail}: {request.method} {request.url.path}"
        if err.status_code == 404:
            message += " (endpoints: /v1/classify, /v1/completions, /v1/chat/completions, /v1/models, /v1/usage, /health)"
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                            status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse({"error": {"message": f"invalid request: {err.errors()}", "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": f"internal server error: {type(err).__name__}", "type": "server_error",
                                       "param": None, "code": None}}, status_code=500)

    @app.get("/health")
    async def health():
        queue = batcher()
        return {"status": "ok", "model": engine.model_id, "auth": accountant.auth_required,
                "uptime_s": round(time.time() - started, 3), "queued_texts": queue.pending,
                "merged_calls": queue.merged_calls, "forward_calls": engine.forward_calls,
                "texts_scored": engine.texts_scored, "cache_hits": engine.cache.hits, "peak_rss_mb": round(peak_rss_mb(), 1),
                "rss_mb": None if (now := rss_mb()) is None else round(now, 1),
                "threads": threading.active_count()}

    @app.get("/v1/models")
    async def models(account: Account = Depends(authenticate)):
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": int(started),
                                            "owned_by": "fedprompt", "context_length": engine.context_length,
                                            "max_logprobs": limits.max_logprobs}]}

    @app.get("/v1/usage")
    async def usage(request: Request, account: Account = Depends(authenticate)):
        everyone = request.query_params.get("all", "").lower() in ("1", "true", "yes")
        if everyone and not account.admin:
            raise Forbidden("only admin keys may read every key's usage (admin=true in the keys file)")
        return accountant.report(account, everyone)

    @app.post("/v1/classify")
    async def classify(request: Request, account: Account = Depends(authenticate)):
        req = parse_request(await request.body(), ClassifyRequest)
        check_model(req.model)
        plan = await run_in_threadpool(engine.plan_classify, req.texts, req.labels)
        cost = Usage(requests=1, queries=len(plan.texts), prompt_tokens=plan.prompt_tokens)
        reserved = accountant.reserve(account, cost)
        scores = await run_job(request, batcher().submit_classify(plan.texts, plan.labels), account, reserved)
        body = classify_response(engine.model_id, scores, req.labels_only, plan.prompt_tokens, plan.texts)
        return respond(request, body, account, reserved, cost.copy())

    async def complete(request, account, prompts, max_tokens, top_k, echo, stop):
        if max_tokens > limits.max_new_tokens:
            raise InvalidRequest(f"max_tokens {max_tokens} is over this server's limit of {limits.max_new_tokens} "
                                 "(service.limits.max_new_tokens)", param="max_tokens")
        if top_k > limits.max_logprobs:
            raise InvalidRequest(f"at most {limits.max_logprobs} log-probs per position, asked for {top_k}", param="logprobs")
        plans = await run_in_threadpool(engine.plan_prompts, prompts, max_tokens, echo, top_k)
        prompt_tokens = sum(len(p.ids) for p in plans)
        reserved = accountant.reserve(account, Usage(requests=1, queries=len(plans), prompt_tokens=prompt_tokens,
                                                     completion_tokens=max_tokens * len(plans)))
        job = CompletionJob(plans, max_tokens, top_k, echo, stop)
        comps = await run_job(request, batcher().submit_complete(job), account, reserved)
        actual = Usage(requests=1, queries=len(plans), prompt_tokens=prompt_tokens,
                       completion_tokens=sum(len(c.gen_ids) for c in comps))
        return plans, comps, reserved, actual

    @app.post("/v1/completions")
    async def completions(request: Request, account: Account = Depends(authenticate)):
        req = parse_request(await request.body(), CompletionRequest)
        check_model(req.model)
        check_sampling(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        plans, comps, reserved, actual = await complete(request, account, prompts, max_tokens, req.logprobs or 0,
                                                        req.echo, stop_strings(req.stop))
        body = completion_body(engine, plans, comps, req.echo, req.logprobs is not None)
        return respond(request, body, account, reserved, actual)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, account: Account = Depends(authenticate)):
        req = parse_request(await request.body(), ChatCompletionRequest)
        check_model(req.model)
        check_sampling(req)
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = limits.max_new_tokens if max_tokens is None else max_tokens
        prompt = engine.render_chat([m.model_dump(exclude_none=True) for m in req.messages])
        plans, comps, reserved, actual = await complete(request, account, [prompt], max_tokens, req.top_logprobs or 0,
                                                        False, stop_strings(req.stop))
        return respond(request, chat_body(engine, plans[0], comps[0], req.logprobs), account, reserved, actual)

    return app


async def _disconnected(receive) -> None:
    """Returns when the client has closed the connection (the body was read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _engine(model, tokenizer, settings: ServerSettings, device, dtype) -> ScoringEngine:
    from fedprompt.models.registry import load_causal_lm, load_tokenizer

    if isinstance(model, str):
        model_id = settings.model_id or model
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_causal_lm(model, device, dtype)
    elif tokenizer is None:
        raise ValueError("create_app: pass the tokenizer with a loaded model")
    else:
        model_id = settings.model_id or getattr(model.config, "name_or_path", None) or "model"
    return ScoringEngine(model, tokenizer, settings.limits, settings.batch_size, settings.cache_size, str(model_id))
