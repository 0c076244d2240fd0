"""JSON over HTTP for the network clients: timeouts, retries with exponential backoff, byte counts.

Retried: failures to connect (server down or restarting), a connection dropped before any answer, 5xx,
and 429 *with* ``Retry-After`` (an overloaded server). Never retried: other 4xx, including a 429 without
``Retry-After`` (an exhausted budget), and read timeouts (the server may still be working on it).

Every error names the request (method and full URL), the HTTP status and the server's answer (its error
message, else its body, cut to :data:`BODY_EXCERPT` characters). Only for fedprompt's own default URL does
a connection failure suggest starting ``fedprompt serve``: any other URL may be any server.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
from dataclasses import dataclass

import httpx

from fedprompt.blackbox.errors import BadResponse, ServiceUnavailable, error_from_response
from fedprompt.blackbox.protocol import encode_json

log = logging.getLogger("fedprompt.blackbox")

BODY_EXCERPT = 300  # characters of a server's error body quoted in an exception
DEFAULT_URLS = ("http://127.0.0.1:8000", "http://localhost:8000")  # where `fedprompt serve` listens by default

_RETRY_NETWORK = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                  httpx.WriteError)


@dataclass
class Exchange:
    body: dict
    bytes_sent: int      # request bodies of every attempt that reached the server
    bytes_received: int  # response bodies of every attempt
    attempts: int


def join_url(base: str, path: str) -> str:
    """``base`` and ``path`` with exactly one ``/`` between them (``http://h/v1`` + ``/completions``)."""
    return f"{base.rstrip('/')}/{path.lstrip('/')}" if path else base.rstrip("/")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: treat as absent and use our own backoff


class JsonTransport:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 300.0,
                 connect_timeout_s: float = 5.0, retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 ca_file: str | None = None, transport: httpx.BaseTransport | None = None, sleep=time.sleep) -> None:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # ca_file: a private CA (scripts/make-certs.sh) for an https:// service; else the system's trust store.
        verify = ssl.create_default_context(cafile=os.path.expanduser(ca_file)) if ca_file else True
        self.base_url = base_url.rstrip("/")
        # Requests carry absolute URLs (join_url): httpx's base_url would add a "/" of its own.
        self.client = httpx.Client(headers=headers, transport=transport, verify=verify,
                                   timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        self.retries, self.backoff_s, self.max_backoff_s, self._sleep = retries, backoff_s, max_backoff_s, sleep
        self.timeout_s = timeout_s

    def url(self, path: str) -> str:
        return join_url(self.base_url, path)

    def _delay(self, attempt: int, hint: float | None) -> float:
        delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        if hint is not None:
            delay = max(delay, min(hint, self.max_backoff_s * 4))
        return delay * (1 + 0.1 * random.random())  # jitter: clients that failed together do not retry together

    def request(self, method: str, path: str, payload: dict | None = None, *, retry_5xx: bool = True) -> Exchange:
        """One JSON exchange. ``retry_5xx=False`` raises a 5xx answer at once (a probe whose failure the
        caller handles itself); connection failures and answers with ``Retry-After`` are retried regardless."""
        content = encode_json(payload) if payload is not None else None
        url = self.url(path)
        where = f"{method} {url}"
        sent = received = 0
        last, last_status, hint, network_failure = "", None, None, False
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self._delay(attempt - 1, hint)
                # Operators (and the restart test) see a service outage here, not only when the retries run out.
                log.warning("%s: %s; retry %d of %d in %.1f s", where, last, attempt, self.retries, delay)
                self._sleep(delay)
            hint = None
            try:
                response = self.client.request(method, url, content=content)
            except _RETRY_NETWORK as err:
                last, last_status, network_failure = f"{type(err).__name__}: {err}", None, True
                continue
            except httpx.TimeoutException as err:
                raise ServiceUnavailable(f"{where} got no answer within {self.timeout_s} s "
                                         f"({type(err).__name__}); raise service.client.timeout_s or send fewer texts") from None
            except httpx.HTTPError as err:
                raise ServiceUnavailable(f"{where} failed: {err}") from None
            sent += len(content or b"")
            received += len(response.content)
            if response.is_success:
                try:
                    body = response.json()
                except ValueError:
                    raise BadResponse(f"{where} answered HTTP {response.status_code} with a body that is not JSON: "
                                      f"{_excerpt(response.text)!r}") from None
                if not isinstance(body, dict):
                    raise BadResponse(f"{where} answered with JSON that is not an object: {_excerpt(response.text)!r}")
                return Exchange(body, sent, received, attempt + 1)
            hint = _retry_after(response)
            error = error_from_response(response.status_code, _json_or_text(response), hint, where=where)
            # Retry-After (503 or 429) means "busy, come back": retried even where other 5xx are not.
            retry = (response.status_code >= 500 and (retry_5xx or hint is not None)) or \
                (response.status_code == 429 and hint is not None)
            if retry:
                last, last_status = f"HTTP {response.status_code}: {_excerpt(response.text)}", response.status_code
                network_failure = False
                continue
            raise error
        message = f"{where} failed after {self.retries + 1} attempts; last error: {last}"
        if network_failure:
            message += f". Nothing answered at {self.base_url}: is the server running there and reachable?"
            if self.base_url.removesuffix("/v1") in DEFAULT_URLS:
                message += " (this is fedprompt's default URL: start one with `fedprompt serve`)"
        error = ServiceUnavailable(message)
        if last_status is not None:
            error.status = error.http_status = last_status
        raise error

    def close(self) -> None:
        self.client.close()


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= BODY_EXCERPT else text[:BODY_EXCERPT] + "..."


def _json_or_text(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return response.text


def require(body: dict, key: str, path: str):
    if key not in body:
        raise BadResponse(f"{path} answered without {key!r}: {str(body)[:200]}")
    return body[key]
