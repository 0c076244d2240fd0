"""What stands between the network and the service: who may send a body, how much, how fast, how many at once.

Two layers, both cheap and both before any JSON is parsed:

- :class:`GuardedH11` (the connection): uvicorn's h11 protocol with a cap on connections served at once
  (``max_connections``; the next ones get 429 + Retry-After and are closed) and a time limit on the request
  line and headers (``header_timeout_s``; a slowloris client that never finishes its headers is closed).
  uvicorn reads at most 64 KiB of a body ahead of the app, so a connection the app does not read costs little.
- :class:`Gate` (the request, an ASGI middleware): the API key from the headers first (401 before a byte of
  the body is read), then the body under a size cap counted while it streams (``max_request_bytes``) and a
  time limit (``body_timeout_s``; 408).

So an unauthenticated client holds at most ``max_connections`` sockets of ~64 KiB each for
``header_timeout_s``, and an authenticated one at most ``max_connections x max_request_bytes`` of bodies.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from fedprompt.blackbox.accounting import Accountant
from fedprompt.blackbox.errors import AuthError, BlackBoxError, BodyTimedOut, Overloaded, PayloadTooLarge
from fedprompt.blackbox.protocol import encode_json
from fedprompt.blackbox.settings import Limits

OPEN = frozenset({("GET", "/health"), ("HEAD", "/health")})  # no key: load balancers and `fedprompt deploy` poll it
MAX_HEAD_BYTES = 16 * 1024           # request line + headers (uvicorn's default, made explicit); 400 past it


async def send_error(send, err: BlackBoxError, close: bool = True) -> None:
    """Answer ``err`` as the service's JSON error; ``close``: the body may be unread, so end the connection."""
    body = encode_json(err.to_json())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if err.retry_after is not None:
        headers.append((b"retry-after", str(max(1, int(round(err.retry_after)))).encode()))
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Gate:
    """ASGI middleware: authenticate from the headers, then read the body within its size and time limits.

    The account goes to ``scope["state"]["account"]`` (``request.state.account`` in the handlers), the body's
    size to ``scope["state"]["body_bytes"]``; the handlers then read the body from memory."""

    def __init__(self, app, accountant: Accountant, limits: Limits) -> None:
        self.app, self.accountant, self.limits = app, accountant, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        account = None
        if (scope["method"], scope["path"]) not in OPEN:
            try:
                account = state["account"] = self.accountant.authenticate(_header(scope, b"authorization"))
            except AuthError as err:
                return await send_error(send, err)  # before the body: a stranger's upload is never read
        try:
            body = await self._read_body(scope, receive)
        except BlackBoxError as err:
            if account is not None:
                self.accountant.reject(account)
            return await send_error(send, err)
        if body is None:  # the client left while sending
            return
        state["body_bytes"] = len(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # from now on: the client's disconnect (handlers watch for it)

        return await self.app(scope, replay, send)

    async def _read_body(self, scope, receive) -> bytes | None:
        limit, timeout_s = self.limits.max_request_bytes, self.limits.body_timeout_s
        too_large = PayloadTooLarge(f"request body over {limit} bytes (service.limits.max_request_bytes); "
                                    "send fewer or shorter texts per request")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large  # refused before reading: the declared size is enough
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise BodyTimedOut(f"the request body did not arrive within {timeout_s:g} s "
                                   "(service.limits.body_timeout_s); send it at once, or a smaller one") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # counted as it streams: a body without (or lying about) its length stops here
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _raw_response(status: int, reason: str, err: BlackBoxError) -> bytes:
    """A whole HTTP/1.1 response written straight to the socket (no request has been parsed to answer)."""
    body = encode_json(err.to_json())
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a time limit on each request's head.

    Use :func:`guarded_protocol` to get one with the server's limits (uvicorn builds the protocol itself)."""

    max_connections = Limits().max_connections
    header_timeout_s = Limits().header_timeout_s

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        served = sum(1 for c in self.connections if c is not self and getattr(c, "admitted", False))
        self.admitted = served < self.max_connections
        if not self.admitted:
            # Answered once its request head arrives (closing now could reset the socket before the client
            # reads why); it holds no body and is closed right after.
            self.app = _too_many_connections(self.max_connections)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head arrived: from here the body timeout applies
            self._cancel_head_timer()

    def shutdown(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        super().shutdown()
        if idle:  # a TLS close waits for the client's close_notify, which an idle pooled client never sends
            self.transport.abort()

    def send_400_response(self, msg: str) -> None:
        # h11 found the request malformed mid-body (a bad chunk) while the app may already be answering it:
        # this 400 ends the connection, so whatever the app sends next is dropped, as for a client that left.
        super().send_400_response(msg)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def on_response_complete(self) -> None:
        self._arm_head_timer()  # the next request on this keep-alive connection gets its own head limit
        super().on_response_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer: asyncio.TimerHandle | None = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        err = BodyTimedOut(f"the request line and headers did not arrive within {self.header_timeout_s:g} s "
                           "(service.limits.header_timeout_s)")
        self.transport.write(_raw_response(408, "Request Timeout", err))
        self.transport.close()


def _too_many_connections(limit: int):
    async def refuse(scope, receive, send):
        err = Overloaded(f"too many connections: this server serves {limit} at once (service.limits.max_connections); "
                         "retry shortly", retry_after=1.0)
        await send_error(send, err)

    return refuse


def guarded_protocol(limits: Limits) -> type[GuardedH11]:
    """A :class:`GuardedH11` class with these limits, to pass as uvicorn's ``http``."""
    return type("GuardedH11", (GuardedH11,), {"max_connections": limits.max_connections,
                                              "header_timeout_s": limits.header_timeout_s})
