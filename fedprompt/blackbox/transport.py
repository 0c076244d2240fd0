"""JSON over HTTP for the network clients: timeouts, retries with exponential backoff, byte counts.

Retried: failures to connect (server down or restarting), a connection dropped before any answer, 5xx,
and 429 *with* ``Retry-After`` (an overloaded server). Never retried: other 4xx, including a 429 without
``Retry-After`` (an exhausted budget), and read timeouts (the server may still be working on it).
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

_RETRY_NETWORK = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                  httpx.WriteError)


@dataclass
class Exchange:
    body: dict
    bytes_sent: int      # request bodies of every attempt that reached the server
    bytes_received: int  # response bodies of every attempt
    attempts: int


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
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, transport=transport, verify=verify,
                                   timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        self.retries, self.backoff_s, self.max_backoff_s, self._sleep = retries, backoff_s, max_backoff_s, sleep
        self.timeout_s = timeout_s

    def _delay(self, attempt: int, hint: float | None) -> float:
        delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        if hint is not None:
            delay = max(delay, min(hint, self.max_backoff_s * 4))
        return delay * (1 + 0.1 * random.random())  # jitter: clients that failed together do not retry together

    def request(self, method: str, path: str, payload: dict | None = None) -> Exchange:
        content = encode_json(payload) if payload is not None else None
        sent = received = 0
        last, hint = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self._delay(attempt - 1, hint)
                # Operators (and the restart test) see a service outage here, not only when the retries run out.
                log.warning("%s %s%s: %s; retry %d of %d in %.1f s", method, self.client.base_url, path, last, attempt,
                            self.retries, delay)
                self._sleep(delay)
            hint = None
            try:
                response = self.client.request(method, path, content=content)
            except _RETRY_NETWORK as err:
                last = f"{type(err).__name__}: {err}"
                continue
            except httpx.TimeoutException as err:
                raise ServiceUnavailable(f"{method} {self.client.base_url}{path} got no answer within {self.timeout_s} s "
                                         f"({type(err).__name__}); raise service.client.timeout_s or send fewer texts") from None
            except httpx.HTTPError as err:
                raise ServiceUnavailable(f"{method} {self.client.base_url}{path} failed: {err}") from None
            sent += len(content or b"")
            received += len(response.content)
            if response.is_success:
                try:
                    body = response.json()
                except ValueError:
                    raise BadResponse(f"{path} answered {response.status_code} with a body that is not JSON: "
                                      f"{response.text[:200]!r}") from None
                if not isinstance(body, dict):
                    raise BadResponse(f"{path} answered with JSON that is not an object: {response.text[:200]!r}")
                return Exchange(body, sent, received, attempt + 1)
            hint = _retry_after(response)
            error = error_from_response(response.status_code, _json_or_text(response), hint)
            if response.status_code >= 500 or (response.status_code == 429 and hint is not None):
                last = error.message
                continue
            raise error
        raise ServiceUnavailable(f"{method} {self.client.base_url}{path} failed after {self.retries + 1} attempts; "
                                 f"last error: {last}. Is the server running (fedprompt serve)?")

    def close(self) -> None:
        self.client.close()


def _json_or_text(response: httpx.Response):
    try:
        return response.json()
    except ValueError:
        return response.text


def require(body: dict, key: str, path: str):
    if key not in body:
        raise BadResponse(f"{path} answered without {key!r}: {str(body)[:200]}")
    return body[key]
