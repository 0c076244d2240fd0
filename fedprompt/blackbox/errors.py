"""Errors of the black-box service, shared by the server (as HTTP statuses) and every client (raised).

The in-process client raises the same classes with the same messages as the server sends, so a method
sees one error whatever transport it uses. Each error carries the HTTP status the server answers with
and an OpenAI-style ``type``/``code`` for the JSON body.
"""

from __future__ import annotations

from fedprompt.errors import FedPromptError


class BlackBoxError(FedPromptError):
    """A call to the black box failed; ``status`` is the HTTP status it maps to."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None
    http_status: int | None = None  # client side: the status a server actually answered with (None: no answer)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_json(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(BlackBoxError):
    """Malformed JSON (400) or a well-formed request with wrong or unsupported values (422)."""


class ValidationFailed(InvalidRequest):
    status = 422


class PayloadTooLarge(InvalidRequest):
    """A request over a size limit: bytes, texts per request, labels, tokens."""

    status = 413
    code = "payload_too_large"


class AuthError(BlackBoxError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(BlackBoxError):
    status = 403
    type = "permission_error"


class NotFound(BlackBoxError):
    status = 404
    type = "not_found_error"


class BudgetExhausted(BlackBoxError):
    """The API key's budget cannot cover the request. 429 with OpenAI's code, and no Retry-After:
    waiting does not help, so clients must not retry it."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class Overloaded(BlackBoxError):
    """Too much work queued, or the request ran past the time limit: retry later (Retry-After set)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class RequestTimedOut(BlackBoxError):
    status = 503
    type = "server_error"
    code = "timeout"


class BodyTimedOut(InvalidRequest):
    """The client sent its body too slowly (service.limits.body_timeout_s)."""

    status = 408
    code = "request_timeout"


class ClientGone(BlackBoxError):
    """The client closed the connection before its answer; nobody reads this one (nginx's 499)."""

    status = 499
    code = "client_closed_request"


class ShuttingDown(BlackBoxError):
    """The server was asked to stop while the request waited for the model: retry (against its restart)."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class ServiceUnavailable(BlackBoxError):
    """Client side: the server could not be reached or kept failing after all retries."""

    status = 503
    type = "server_error"
    code = "unavailable"


class BadResponse(BlackBoxError):
    """Client side: the server answered 2xx with a body this client cannot read."""

    status = 502
    type = "server_error"
    code = "bad_response"


_BY_STATUS = {400: InvalidRequest, 401: AuthError, 403: Forbidden, 404: NotFound, 413: PayloadTooLarge,
              422: ValidationFailed}


def error_from_response(status: int, body: object, retry_after: float | None = None, *,
                        where: str | None = None) -> BlackBoxError:
    """The exception for an error response of this server or any OpenAI-compatible one.

    The message is the server's own error message, else its body (JSON or text), cut to 300 characters,
    then the status and, if given, ``where`` (the request: method and URL)."""
    import json

    message, code, param = "", None, None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            message = str(err.get("message") or err.get("detail") or "")
            code, param = err.get("code"), err.get("param")
        elif isinstance(err, str):  # some servers: {"error": "..."} or {"detail": "..."}
            message = err
        elif isinstance(body.get("detail"), str):
            message = body["detail"]
        if not message.strip():  # e.g. {"error": {"message": "", ...}}: the body says more than nothing
            message = json.dumps(body, ensure_ascii=False)
    elif isinstance(body, str):
        message = body.strip()
    elif body is not None:
        message = json.dumps(body, ensure_ascii=False)
    message = message if len(message) <= 300 else message[:300] + "..."
    cls: type[BlackBoxError]
    if status == 429:
        cls = BudgetExhausted if code == "insufficient_quota" or retry_after is None else Overloaded
    elif status >= 500:
        cls = ServiceUnavailable
    else:
        cls = _BY_STATUS.get(status, InvalidRequest)
    suffix = f"HTTP {status} from {where}" if where else f"HTTP {status}"
    err = cls(f"{message} ({suffix})" if message else f"empty answer ({suffix})", param=param,
              code=str(code) if code is not None else None, retry_after=retry_after)
    err.status = err.http_status = status
    return err
