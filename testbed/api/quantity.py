"""Kubernetes resource quantities ("250m", "128Mi", "1.5", "1e3"), parsed as apimachinery does.

A quantity is a decimal number with an optional suffix: binary (Ki Mi Gi Ti Pi Ei), decimal SI
(n u m "" k M G T P E) or a decimal exponent (e3, E-2). Values are exact (Decimal), so
"0.1" cpu is 100 millicores and "1Gi" 1073741824 bytes.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

#: apimachinery's own pattern, quoted in its error message.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
FORMAT_ERROR = f"quantities must match the regular expression '{QUANTITY_PATTERN}'"
SUFFIX_ERROR = "unable to parse quantity's suffix"

_QUANTITY = re.compile(QUANTITY_PATTERN)
_NUMBER = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)$")
_EXPONENT = re.compile(r"^[eE][-+]?[0-9]+$")
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


class QuantityError(ValueError):
    """Not a quantity; the message is apimachinery's."""


def parse(text: str) -> Decimal:
    """The exact value of a quantity string, or QuantityError."""
    match = _QUANTITY.match(text.strip() if isinstance(text, str) else "")
    if not match:
        raise QuantityError(FORMAT_ERROR)
    number, suffix = match.groups()
    if not _NUMBER.match(number):
        raise QuantityError(FORMAT_ERROR)
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise QuantityError(FORMAT_ERROR) from None
    if suffix in _BINARY:
        return value * (1 << _BINARY[suffix])
    if suffix in _DECIMAL:
        return value.scaleb(_DECIMAL[suffix])
    if _EXPONENT.match(suffix):
        return value.scaleb(int(suffix[1:]))
    raise QuantityError(SUFFIX_ERROR)


def millicores(text: str) -> int:
    """A cpu quantity in millicores, rounded up as Kubernetes' MilliValue does ("1.5m" -> 2)."""
    return math.ceil(parse(text) * 1000)


def byte_count(text: str) -> int:
    """A memory quantity in bytes, rounded up ("0.5" -> 1)."""
    return math.ceil(parse(text))
