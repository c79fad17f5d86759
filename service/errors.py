"""ServiceError tree (HTTP status + stable code) and the JSON handlers: every error is `{code, message}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class UnsupportedParameter(BadRequest):
    """A request parameter this server does not implement: refused, never silently dropped."""

    code = "unsupported_parameter"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class QuotaExceeded(ServiceError):
    """A per-user limit on what is stored (history items or characters) would be passed."""

    status, code = 409, "quota_exceeded"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class RequestTimeout(ServiceError):
    """A request body did not arrive within its deadline (a stalled upload)."""

    status, code = 408, "request_timeout"


class ClientDisconnected(BadRequest):
    """The client closed the connection before its request body was in: nobody reads this answer, and it is
    no server error."""

    code = "client_disconnected"


class Unprocessable(ServiceError):
    status, code = 422, "invalid_request"


class PromptTooLong(ServiceError):
    status, code = 422, "prompt_too_long"


class TooManyRequests(ServiceError):
    status, code = 429, "too_many_requests"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class AdapterUnavailable(Unavailable):
    """The adapter a request resolved to cannot be read (its version was pruned or deleted between the SQL
    lookup and the load, or its files are damaged). Only that request fails; a retry resolves anew."""

    code = "adapter_unavailable"

    def __init__(self, cause: BaseException | str) -> None:
        why = cause if isinstance(cause, str) else type(cause).__name__
        super().__init__(f"the adapter could not be loaded ({why}); retry later", headers={"Retry-After": "1"})


class GenerationFailed(ServiceError):
    """One row could not be completed (its logits went non-finite, or its sampling failed); the other rows of
    the same engine steps are unaffected. Never a 500: 422 when the row's own inputs (its adapter) produce
    non-finite values, 503 for an internal fault."""

    code = "generation_failed"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @classmethod
    def non_finite(cls) -> GenerationFailed:
        return cls("the model produced non-finite values for this request (is its adapter out of range?)", 422)

    @classmethod
    def nothing_allowed(cls) -> GenerationFailed:
        return cls("this request's constraints (logit_bias, response format) leave no token to choose", 422)

    @classmethod
    def grammar(cls, message: str) -> GenerationFailed:
        return cls(f"the response format could not be followed: {message}", 422)

    @classmethod
    def internal(cls, cause: BaseException) -> GenerationFailed:
        return cls(f"generation failed for this request ({type(cause).__name__}); retry later", 503)


class Timeout(ServiceError):
    status, code = 504, "timeout"


class InsufficientStorage(ServiceError):
    """The disk (or the database's) is full: nothing was written, what was there before is kept."""

    status, code = 507, "insufficient_storage"


def is_storage_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from the OS, or a database saying its disk is full (SQLite: "database or disk is full",
    PostgreSQL: disk_full SQLSTATE 53100), however wrapped."""
    import errno

    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain (a DBAPIError keeps the driver's error in .orig)
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "database or disk is full" in text or getattr(seen, "sqlstate", None) == "53100":
            return True
        orig = getattr(seen, "orig", None)
        seen = orig if isinstance(orig, BaseException) else (seen.__cause__ or seen.__context__)
    return False


def safe_error_text(exc: BaseException) -> str:
    """An exception as text fit for logs and jobs.error: a database error says only its kind (its message can
    quote row values: user data, e.g. PostgreSQL's "Failing row contains ..."), others their message."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    if isinstance(exc, DBAPIError):
        return f"{type(exc).__name__} ({type(exc.orig).__name__}; database details withheld)"
    if isinstance(exc, SQLAlchemyError):
        return f"{type(exc).__name__} (database details withheld)"
    return f"{type(exc).__name__}: {exc}"


class OpenAIErrorOut(BaseModel):
    """OpenAI's error object, on the OpenAI-compatible routes (for_path)."""

    message: str
    type: str  # invalid_request_error, authentication_error, permission_error, not_found_error, ...
    param: str | None = None  # the invalid field, where one is known
    code: str


class ErrorOut(BaseModel):
    """The body of every error response (documented in the OpenAPI schema via error_responses)."""

    code: str
    message: str
    details: Any = None  # present only where there is more to say (e.g. the validation errors)
    error: OpenAIErrorOut | None = None  # on /v1/* only: the same code and message as OpenAI clients read them


_ERROR_DOCS = {
    400: "Bad request (e.g. a body that is not UTF-8)",
    401: "Missing, malformed or invalid API key",
    403: "The key may not act on this resource",
    404: "No such user or resource",
    408: "The request body did not arrive in time",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Invalid request",
    429: "Too many requests (per-user queue share or failed authentications); see Retry-After",
    503: "Server saturated or not ready; see Retry-After when present",
    504: "The request passed its deadline",
    507: "No storage space left; nothing was written",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 0}}}
AUTH_ERRORS = (400, 401, 403, 404, 413, 422, 429)  # what any authenticated route may answer
SERVING_ERRORS = (409, 503, 504)  # routes that run the model (adapter conflict, saturation, deadline)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these error statuses, all with the ErrorOut body."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {"model": ErrorOut, "description": _ERROR_DOCS[status]}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return body


OPENAI_PATHS = "/v1/"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def for_path(path: str, status: int, body: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    """The error body for a path: on the OpenAI-compatible routes it also carries OpenAI's `error` object
    ({message, type, param, code}), which OpenAI SDKs and clients read; the fields above stay (additive)."""
    if not path.startswith(OPENAI_PATHS):
        return body
    return {**body, "error": openai_error(status, body, param)}


def openai_error(status: int, body: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for one of our error bodies ({code, message})."""
    kind = "server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error")
    return {"message": body["message"], "type": kind, "param": param, "code": body["code"]}


def _param(details: list[dict[str, Any]]) -> str | None:
    """The first invalid field's name, dotted (`temperature`, `messages.0.content`), as OpenAI's `param`."""
    loc = [str(part) for part in details[0]["loc"] if part != "body"] if details else []
    return ".".join(loc) or None


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    # Only location, message and type: the raw input may be huge or not JSON-serialisable.
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")} for e in errors][
        :50
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        body = for_path(request.url.path, exc.status, error_body(exc.code, exc.message, exc.details))
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _clean_validation_errors(exc.errors())
        body = error_body("invalid_request", "request validation failed", details)
        return JSONResponse(for_path(request.url.path, 422, body, _param(details)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if (details := _unparsable_json(exc)) is not None:
            body = error_body("invalid_request", "request validation failed", details)
            return JSONResponse(for_path(request.url.path, 422, body), 422)
        codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout"}
        code = {**codes, 413: "payload_too_large"}.get(exc.status_code, "http_error")
        body = for_path(request.url.path, exc.status_code, error_body(code, str(exc.detail)))
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    @app.exception_handler(OSError)
    async def _os_error(_: Request, exc: OSError) -> JSONResponse:
        return _storage_full_or_internal(exc)

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        return _storage_full_or_internal(exc)

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
        # Every database connection stayed busy for the pool's timeout: saturation, not a bug (503, retry).
        log.warning("database connection pool exhausted: %s", safe_error_text(exc))
        body = error_body("database_busy", "every database connection is busy; retry later")
        return JSONResponse(for_path(request.url.path, 503, body), 503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _internal(exc)


def _unparsable_json(exc: StarletteHTTPException) -> list[dict[str, Any]] | None:
    """FastAPI answers a body that json.loads refuses with anything but JSONDecodeError with a bare 400 ("There
    was an error parsing the body"): valid JSON beyond Python's parser (an integer over 4,300 digits: ValueError;
    nesting past the recursion limit: RecursionError). That is bad input: 422 with these details, as FastAPI's
    invalid JSON (json_invalid), in every JSON route. A body that is not UTF-8 stays 400 (_ERROR_DOCS)."""
    cause = exc.__cause__
    if exc.status_code != 400 or isinstance(cause, UnicodeDecodeError):
        return None
    if isinstance(cause, RecursionError):
        why = "JSON nested too deeply to parse"
    elif isinstance(cause, ValueError):
        why = "a JSON value this server cannot parse (an integer over 4,300 digits)"
    else:
        return None
    return [{"loc": ["body"], "msg": why, "type": "json_invalid"}]


def _storage_full_or_internal(exc: Exception) -> JSONResponse:
    """A full disk (e.g. at the commit: the transaction rolled back, nothing lost) is a 507, not a bug."""
    if is_storage_full(exc):
        log.error("storage full: %s", safe_error_text(exc))
        return JSONResponse(error_body(InsufficientStorage.code, "no storage space left; retry later"), 507)
    return _internal(exc)


def _internal(exc: Exception) -> JSONResponse:
    # Logged, never sent (no tracebacks in responses); database errors without their row values.
    if safe_error_text(exc) == f"{type(exc).__name__}: {exc}":
        log.exception("unhandled error", exc_info=exc)
    else:
        log.error("unhandled error: %s", safe_error_text(exc))
    return JSONResponse(error_body("internal_error", "internal server error"), 500)
