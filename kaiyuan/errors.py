"""One error taxonomy for the whole gateway.

Every failure a client can see is a :class:`GatewayError` of one :class:`ErrorKind`. Each kind maps,
once, to an HTTP status and to the error ``type`` of each wire dialect; dialects serialise it into
their own shape (see ``kaiyuan.dialects.*.error_body``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kaiyuan.redact import scrub


@dataclass(frozen=True, slots=True)
class _KindInfo:
    status: int
    openai_type: str
    anthropic_type: str


class ErrorKind(Enum):
    INVALID_REQUEST = _KindInfo(400, "invalid_request_error", "invalid_request_error")
    AUTHENTICATION = _KindInfo(401, "authentication_error", "authentication_error")
    PAYMENT_REQUIRED = _KindInfo(402, "insufficient_quota", "billing_error")
    PERMISSION = _KindInfo(403, "permission_error", "permission_error")
    NOT_FOUND = _KindInfo(404, "not_found_error", "not_found_error")
    METHOD_NOT_ALLOWED = _KindInfo(405, "invalid_request_error", "invalid_request_error")
    REQUEST_TIMEOUT = _KindInfo(408, "invalid_request_error", "invalid_request_error")
    REQUEST_TOO_LARGE = _KindInfo(413, "invalid_request_error", "request_too_large")
    UNSUPPORTED_MEDIA_TYPE = _KindInfo(415, "invalid_request_error", "invalid_request_error")
    RATE_LIMITED = _KindInfo(429, "rate_limit_error", "rate_limit_error")
    BUDGET_EXCEEDED = _KindInfo(429, "insufficient_quota", "rate_limit_error")
    CLIENT_CLOSED = _KindInfo(499, "client_closed_request", "api_error")
    INTERNAL = _KindInfo(500, "server_error", "api_error")
    UPSTREAM_ERROR = _KindInfo(502, "upstream_error", "api_error")
    UPSTREAM_UNREACHABLE = _KindInfo(502, "upstream_unreachable", "api_error")
    NO_DEPLOYMENT = _KindInfo(503, "service_unavailable", "overloaded_error")
    OVERLOADED = _KindInfo(529, "overloaded_error", "overloaded_error")
    UPSTREAM_TIMEOUT = _KindInfo(504, "timeout", "timeout_error")

    @property
    def status(self) -> int:
        return self.value.status


class GatewayError(Exception):
    """An error with a kind, a message a person can act on, and optional details.

    ``status`` overrides the kind's status (used to pass an upstream's 4xx through unchanged);
    ``headers`` are added to the response (``Retry-After``); ``code`` and ``param`` follow OpenAI.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        upstream_type: str | None = None,
    ) -> None:
        message = scrub(message)  # a secret an upstream echoed never reaches a caller, log or span
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code
        self.status = status or kind.status
        self.headers = headers or {}
        self.upstream_type = upstream_type

    def __repr__(self) -> str:
        return f"GatewayError({self.kind.name}, {self.status}, {self.message!r})"


def invalid(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, message, param=param, code=code)


_STATUS_TO_KIND = {
    400: ErrorKind.INVALID_REQUEST,
    401: ErrorKind.AUTHENTICATION,
    402: ErrorKind.PAYMENT_REQUIRED,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.REQUEST_TOO_LARGE,
    429: ErrorKind.RATE_LIMITED,
    529: ErrorKind.OVERLOADED,
}


# The Anthropic error type of each status Anthropic documents: the type follows the status the
# caller gets, whoever produced the error (the gateway, or an upstream of any protocol).
ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}
# Google's canonical error status (google.rpc.Code) for each HTTP status, for the Gemini dialect.
GOOGLE_STATUS_BY_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    405: "UNIMPLEMENTED", 409: "ABORTED", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED", 529: "UNAVAILABLE",
}
# Statuses a retry cannot fix: answered with ``x-should-retry: false`` (honoured by the OpenAI and
# Anthropic SDKs and by Claude Code, which otherwise retries a 401 ten times).
NO_RETRY_STATUSES = frozenset({400, 401, 402, 403, 404, 405, 413, 415, 422})


def anthropic_type(err: GatewayError, upstream_type: str | None = None) -> str:
    """The Anthropic ``error.type`` for ``err``: from its status; else the upstream's own type; else its kind's."""
    return ANTHROPIC_TYPE_BY_STATUS.get(err.status) or upstream_type or err.kind.value.anthropic_type


def google_status(status: int) -> str:
    return GOOGLE_STATUS_BY_STATUS.get(status) or ("INVALID_ARGUMENT" if 400 <= status < 500 else "INTERNAL")


def kind_for_upstream_status(status: int) -> ErrorKind:
    """The kind that keeps the meaning of an upstream HTTP status."""
    if status in _STATUS_TO_KIND:
        return _STATUS_TO_KIND[status]
    if status == 503:
        return ErrorKind.NO_DEPLOYMENT
    if status == 504:
        return ErrorKind.UPSTREAM_TIMEOUT
    if 400 <= status < 500:
        return ErrorKind.INVALID_REQUEST
    return ErrorKind.UPSTREAM_ERROR
