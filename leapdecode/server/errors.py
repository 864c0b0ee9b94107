"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can cause becomes an `ApiError` with a 4xx status; the app renders it the same way
for every route, so clients written for OpenAI's API handle our errors without special cases.
"""

from __future__ import annotations

from http import HTTPStatus

from starlette.responses import JSONResponse

#: OpenAI's error `type` for a status; anything else 4xx is an invalid request.
_TYPES = {404: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """A request that cannot be served: the status, a message naming what was expected, and the param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400: the request is well-formed HTTP but a field is missing, mistyped or out of range."""
    return ApiError(400, message, param=param, code=code)


def from_status(status: int, headers: dict[str, str] | None = None) -> ApiError:
    """An error for a status the router raised (404 unknown route, 405 wrong method)."""
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    code = phrase.lower().replace(" ", "_")
    messages = {
        404: "no such route; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
        405: "method not allowed for this route",
    }
    return ApiError(status, messages.get(status, phrase), code=code, headers=headers)
