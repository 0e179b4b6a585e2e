"""What every scenario model shares: unknown keys refused, file keys in camelCase."""

from __future__ import annotations

from typing import Annotated, Any, Callable

from pydantic import BaseModel, ConfigDict, PlainSerializer, PlainValidator
from pydantic.alias_generators import to_camel


class Strict(BaseModel):
    """A mapping of the scenario file: every key known (extra="forbid"), written in camelCase
    (field latency_p99 is the key latencyP99), frozen once loaded."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True, strict=True)


def parsed(parse: Callable[[Any], Any], dump: Callable[[Any], Any] = str) -> tuple[PlainValidator, PlainSerializer]:
    """Annotated metadata for a value parsed from its text by parse() and dumped back by dump()."""
    return PlainValidator(parse), PlainSerializer(dump)


def allowed_keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def text_type(parse: Callable[[Any], Any]) -> Any:
    """A field type for a string checked (and kept as written) by parse."""
    return Annotated[str, *parsed(parse, str)]
