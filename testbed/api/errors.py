"""API errors with the gRPC status they travel as, worded as Kubernetes words them."""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from typing import Callable

import grpc

#: How much of a value a message shows; client-go cuts response bodies it logs the same way.
MAX_SHOWN = 1024

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 3, 8, 8, 8, 8
_BRIEF.maxstring, _BRIEF.maxother = 80, 80


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """text, or its first `limit` characters and how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [truncated {len(text) - limit} chars]"


def brief(value: object, quote: Callable[[str], str] = repr) -> str:
    """value for a message: a string quoted (and clipped), anything else as a bounded repr,
    at a cost and length bounded however large or deep the value is."""
    if isinstance(value, str):
        if len(value) <= MAX_SHOWN:
            return quote(value)
        return f"{quote(value[:MAX_SHOWN])} [truncated {len(value) - MAX_SHOWN} chars]"
    return clip(_BRIEF.repr(value))


def plain(value: object) -> str:
    """value unquoted, for a message that puts it in quotes of its own; bounded as brief()."""
    return clip(value) if isinstance(value, str) else clip(_BRIEF.repr(value))


def _show(value: object) -> str:
    if isinstance(value, str):
        return brief(value, json.dumps)
    return clip(json.dumps(value) if isinstance(value, list) else str(value))


@dataclass(frozen=True)
class FieldError:
    path: str
    kind: str  # Invalid, Required, Unsupported, Duplicate, Forbidden, TooLong
    value: object = None
    detail: str = ""

    def __str__(self) -> str:
        if self.kind == "Required":
            return f"{self.path}: Required value" + (f": {self.detail}" if self.detail else "")
        if self.kind == "Forbidden":
            return f"{self.path}: Forbidden: {self.detail}"
        if self.kind == "Unsupported":
            return f"{self.path}: Unsupported value: {_show(self.value)}: supported values: {self.detail}"
        if self.kind == "TooLong":  # never the value: it is the too-long thing
            return f"{self.path}: Too long: {self.detail}"
        if self.kind == "Duplicate":
            return f"{self.path}: Duplicate value: {_show(self.value)}"
        return f"{self.path}: Invalid value: {_show(self.value)}: {self.detail}"


def invalid(path: str, value: object, detail: str) -> FieldError:
    return FieldError(path, "Invalid", value, detail)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(path, "Required", None, detail)


def unsupported(path: str, value: object, supported: tuple[str, ...]) -> FieldError:
    return FieldError(path, "Unsupported", value, ", ".join(json.dumps(s) for s in supported))


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(path, "Forbidden", None, detail)


def duplicate(path: str, value: object) -> FieldError:
    return FieldError(path, "Duplicate", value)


def too_long(path: str, max_bytes: int) -> FieldError:
    return FieldError(path, "TooLong", None, f"must have at most {max_bytes} bytes")


class ApiError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Invalid(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, kind: str, name: str, errors: list[FieldError]) -> None:
        joined = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
        super().__init__(f'{kind} "{plain(name)}" is invalid: {joined}')
        self.errors = errors


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(ApiError):
    code = grpc.StatusCode.ABORTED


class Expired(ApiError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class RangeFull(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TooLarge(ApiError):
    """A write over the size limit (HTTP 413 in Kubernetes); travels as RESOURCE_EXHAUSTED."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {cls.code: cls for cls in (NotFound, AlreadyExists, Conflict, Expired, Unauthenticated, RangeFull)}


def from_status(code: grpc.StatusCode, message: str) -> ApiError:
    """The client-side ApiError for a gRPC status, so callers catch NotFound, Conflict, ..."""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        err: ApiError = ApiError(message)
        err.code = code
        return err
    cls = _BY_CODE.get(code)
    if cls is None:
        err = ApiError(message)
        err.code = code
        return err
    return cls(message)
