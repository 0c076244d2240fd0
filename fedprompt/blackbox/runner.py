"""Run the service app with uvicorn: in the foreground (``fedprompt serve``) or in a background thread
(tests, benchmarks, notebooks: ``with RunningServer(app) as server: ... server.url``)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from fedprompt.blackbox.guard import MAX_HEAD_BYTES, guarded_protocol
from fedprompt.blackbox.settings import Limits


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Once told to stop, the server lets requests already on the model finish for WORK_GRACE_S, then stops the
# model's work (they are answered 503 "shutting down"), and closes what is left at SHUTDOWN_GRACE_S.
WORK_GRACE_S = 2.0
SHUTDOWN_GRACE_S = 3


def uvicorn_config(app, host: str, port: int, log_level: str = "warning", ssl_certfile: str | None = None,
                   ssl_keyfile: str | None = None) -> uvicorn.Config:
    """One event loop, no workers (the model runs in the batcher's thread, which the lifespan starts), and
    the connection guards of :mod:`fedprompt.blackbox.guard` with the app's limits."""
    limits = getattr(getattr(app, "state", None), "limits", None) or Limits()
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", access_log=False, ws="none",
                          ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, http=guarded_protocol(limits),
                          # uvicorn annotates timeout_keep_alive as int but only hands it to loop.call_later (float)
                          timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)


class ServiceServer(uvicorn.Server):
    """uvicorn that, told to stop, gives the requests on the model ``WORK_GRACE_S`` to finish, then stops the
    model's work (``app.state.begin_shutdown``): what still waits is answered 503 "shutting down" instead of
    holding the exit for up to ``request_timeout_s``, and the worker thread is out of torch before the
    interpreter exits."""

    async def shutdown(self, sockets=None) -> None:
        begin = getattr(getattr(self.config.app, "state", None), "begin_shutdown", None)
        timer = asyncio.get_running_loop().call_later(WORK_GRACE_S, begin) if begin is not None else None
        try:
            await super().shutdown(sockets=sockets)
        finally:
            if timer is not None:
                timer.cancel()
            if begin is not None:
                begin()  # idempotent; the lifespan's close then waits for the worker


class RunningServer:
    """uvicorn in a daemon thread; ``port=0`` binds a free port, read it back from ``url``. With a certificate
    and key (PEM) it serves HTTPS."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
        self.server = ServiceServer(uvicorn_config(app, host, port, log_level, ssl_certfile, ssl_keyfile))
        self.host, self.scheme = host, "https" if ssl_certfile else "http"
        self._thread = threading.Thread(target=self.server.run, name="fedprompt-uvicorn", daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the black-box server did not start (port taken? see the log above)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> RunningServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
