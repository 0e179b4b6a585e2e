"""The scalar values of a scenario file: durations, rates, comparisons, bandwidths, percents.

Each is parsed from the text a user writes ("40s", "20/s", ">= 0.99", "1mbit", "20%") by one
function that raises ValueError with a message naming the value; the pydantic types at the end
(`Duration`, `Rate`, ...) wrap those functions so that models use them as field types.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from testbed.cluster.config import parse_duration as _parse_go_duration
from testbed.scenario.base import parsed


def parse_duration(value: Any) -> float:
    """Seconds from "500ms", "40s", "2m", "1m30s" or a bare number of seconds; never negative."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"invalid duration {value!r} (e.g. 500ms, 5s, 1m)")
    seconds = _parse_go_duration(value.strip() if isinstance(value, str) else value)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"invalid duration {value!r}: must be a time of 0 or more (e.g. 500ms, 5s, 1m)")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest usual spelling: 0.5 -> "500ms", 10 -> "10s", 90 -> "90s", 1.25 -> "1.25s"."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|min|h)\s*$")
_PER = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(value: Any) -> float:
    """Requests per second from "20/s", "120/m" or "3600/h" (a bare number is per second); more than 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str) and (m := _RATE.match(value)):
        rate = float(m.group(1)) / _PER[m.group(2)]
    else:
        raise ValueError(f"invalid rate {value!r} (e.g. 20/s, 120/m)")
    if not 0 < rate < float("inf"):
        raise ValueError(f"invalid rate {value!r}: must be more than 0")
    return rate


def parse_percent(value: Any) -> float:
    """A percentage from 20, 20.5 or "20%": more than 0, at most 100."""
    text = value.strip().removesuffix("%") if isinstance(value, str) else value
    try:
        if isinstance(text, bool):
            raise ValueError
        percent = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"invalid percent {value!r} (e.g. 20 or 20%)") from None
    if not 0 < percent <= 100:
        raise ValueError(f"invalid percent {value!r}: must be more than 0 and at most 100")
    return percent


@dataclass(frozen=True)
class Bandwidth:
    """A link rate as tc writes it: bit, kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps (bytes/s)."""

    bits_per_second: int
    text: str  # tc's own spelling, e.g. "1mbit"

    _UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
              "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
    _FORM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")

    @classmethod
    def parse(cls, value: Any) -> "Bandwidth":
        if isinstance(value, Bandwidth):
            return value
        m = cls._FORM.match(value) if isinstance(value, str) else None
        unit = m.group(2).lower() if m else ""
        if not m or unit not in cls._UNITS:
            raise ValueError(f"invalid bandwidth {value!r} (e.g. 1mbit, 500kbit; units {', '.join(cls._UNITS)})")
        bits = round(float(m.group(1)) * cls._UNITS[unit])
        if bits < 8:
            raise ValueError(f"invalid bandwidth {value!r}: must be at least 8bit")
        return cls(bits, f"{m.group(1)}{unit}")

    def __str__(self) -> str:
        return self.text


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Comparison:
    """An expected value as written in an assertion: ">= 0.99", "<= 200ms", "> 95%".

    value is a plain number; a duration is in seconds, a percent a fraction ("95%" -> 0.95);
    unit says which of the three was written."""

    op: str
    value: float
    unit: str  # "number" | "duration" | "percent"
    text: str

    @classmethod
    def parse(cls, value: Any) -> "Comparison":
        if isinstance(value, Comparison):
            return value
        m = _COMPARISON.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(f"invalid comparison {value!r}: want an operator ({', '.join(_OPS)}) and a value, "
                             f'quoted, e.g. ">= 0.99" or "<= 200ms"')
        op, operand = m.groups()
        number, unit = _operand(operand, value)
        return cls(op, number, unit, f"{op} {operand}")

    def holds(self, measured: float) -> bool:
        return _OPS[self.op](measured, self.value)

    def __str__(self) -> str:
        return self.text


def _operand(text: str, whole: str) -> tuple[float, str]:
    if text.endswith("%"):
        return parse_percent(text) / 100, "percent"
    try:
        return float(text), "number"
    except ValueError:
        pass
    try:
        return parse_duration(text), "duration"
    except ValueError:
        raise ValueError(f"invalid comparison {whole!r}: {text!r} is not a number, a percent or a duration") from None


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"invalid duration {value!r}: must be more than 0")
    return seconds


#: Field types for models: values in seconds / per second / percent; dumped as numbers or text.
Duration = Annotated[float, *parsed(parse_duration, float)]
PositiveDuration = Annotated[float, *parsed(_positive_duration, float)]
Rate = Annotated[float, *parsed(parse_rate, float)]
Percent = Annotated[float, *parsed(parse_percent, float)]
BandwidthValue = Annotated[Bandwidth, *parsed(Bandwidth.parse, str)]
ComparisonValue = Annotated[Comparison, *parsed(Comparison.parse, str)]
