"""Small helpers over object metadata shared by the server and its clients."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def copy_of(obj: M) -> M:
    out = type(obj)()
    out.CopyFrom(obj)
    return out
