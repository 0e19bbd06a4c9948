"""Errors the gateway answers with, in OpenAI's shape: {"error": {"message", "type", "code"}}."""

from __future__ import annotations

import math
from typing import Any


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.route: str | None = None  # the router chain's explanation, once the request was routed
        self.request_id: str | None = None
        self.attempts: list[dict[str, Any]] | None = None  # every upstream attempt, when any was made

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.code,
        }
        if self.attempts:
            error["attempts"] = self.attempts
        return {"error": error}

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.retry_after is not None and math.isfinite(self.retry_after):
            out["retry-after"] = str(min(max(1, int(-(-self.retry_after // 1))), 3600))
        if self.route:
            out["x-rswitch-route"] = self.route
        if self.request_id:
            out["x-rswitch-request-id"] = self.request_id
        return out


def bad_request(message: str, *, code: str = "invalid_request", param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code=code, param=param)
