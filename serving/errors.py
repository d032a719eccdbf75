"""Errors of the HTTP API: :class:`ApiError` (answered as the JSON ``ErrorBody``) and the one
way a pydantic validation error becomes a one-line message (API, CLIs)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An error answered as JSON ``ErrorBody``: ``{"status", "error", "message"[, "details"]}``."""

    def __init__(self, status: int, error: str, message: str, headers: dict[str, str] | None = None, details: list | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.headers, self.details = status, error, message, headers, details


def error_response(status: int, error: str, message: str, headers: dict | None = None, details: list | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "error": error, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


def validation_details(err) -> list[dict[str, Any]]:
    """The problems of a pydantic ``ValidationError`` (or FastAPI's ``RequestValidationError``)
    as ``[{"loc": [...], "msg": str, "type": str}, ...]`` (no input values, no URLs)."""
    return [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in err.errors()]


def validation_message(err, default_loc: str = "body") -> str:
    """One line naming every problem: ``"boxes.0: Input should be a valid list; max_instances: ..."``."""
    details = validation_details(err)
    if not details:
        return f"{default_loc}: invalid"
    return "; ".join(f"{'.'.join(str(x) for x in d['loc']) or default_loc}: {d['msg']}" for d in details)
