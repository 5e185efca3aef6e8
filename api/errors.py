"""Errors of the service and THE one place where errors become HTTP responses.

Every error response has the body ``{"code": ..., "message": ..., "details": {...}}``. Domain
errors (:class:`appliance.errors.ApplianceError`) carry their ``code``; their ``kind`` picks the
status from :data:`STATUS_BY_KIND`. Request validation failures answer 422 with the code
``validation_error``; routing errors keep Starlette's status with a code of their own.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError

log = logging.getLogger(__name__)

STATUS_BY_KIND: dict[str, int] = {
    "not_found": 404,
    "invalid": 400,
    "conflict": 409,
    "unauthorized": 401,
    "forbidden": 403,
    "throttled": 429,
    "insufficient_storage": 507,
    "internal": 500,
}

#: Codes whose status differs from their kind's: a failover that QEMU could not boot or whose
#: boot could not be proven is the VM's failure, not the appliance's (502, like a bad upstream).
#: ``point_not_local`` and ``insufficient_memory`` are kind ``conflict`` already (409).
STATUS_BY_CODE: dict[str, int] = {
    "failover_failed": 502,
    "boot_proof_failed": 502,
    # A location that is not there now (an unmounted pool, a pulled disk) or a backend that
    # failed in a way worth retrying: the request may succeed later.
    "location_unavailable": 503,
    "backend_transient": 503,
    # A recovery from tapes restarts the service on the recovered store (api.tape_recovery).
    "service_restarting": 503,
}

CODE_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


class AuthenticationRequired(ApplianceError):
    """Sign in or send an API token (Authorization: Bearer ...)."""

    code = "unauthenticated"
    kind = "unauthorized"


class InvalidCredentials(ApplianceError):
    """The user name or password is wrong."""

    code = "invalid_credentials"
    kind = "unauthorized"


class PermissionDenied(ApplianceError):
    """Your role does not allow this."""

    code = "forbidden"
    kind = "forbidden"


class CsrfFailed(ApplianceError):
    """The request lacks a valid X-CSRF-Token header; reload the page and try again."""

    code = "csrf_failed"
    kind = "forbidden"


class LoginThrottled(ApplianceError):
    """Too many failed sign-ins; wait before trying again."""

    code = "login_throttled"
    kind = "throttled"


class LocationRefused(ApplianceError):
    """The place did not accept being added as a location (a missing bucket, refused
    credentials, an unreachable endpoint); nothing was added."""

    code = "location_refused"
    kind = "invalid"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": jsonable_encoder(details or {})}


def _appliance_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApplianceError)
    status = STATUS_BY_CODE.get(exc.code) or STATUS_BY_KIND.get(exc.kind, 500)
    if status >= 500:
        log.error("%s %s failed: [%s] %s", request.method, request.url.path, exc.code, exc)
    headers = {}
    retry_after = exc.details.get("retry_after")
    if status == 429 and isinstance(retry_after, int | float):
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(exc.code, exc.message, exc.details), status_code=status, headers=headers
    )


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "message": "invalid request"}
    where = ".".join(str(part) for part in first["loc"][1:]) or "request"
    return JSONResponse(
        error_body("validation_error", f"{where}: {first['message']}", {"errors": errors}),
        status_code=422,
    )


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = CODE_BY_STATUS.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return JSONResponse(
        error_body(code, message),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body("internal_error", "the appliance hit an unexpected error; see its log"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApplianceError, _appliance_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
