"""Typed stage configs: validated once at the edge, split into content fields and runtime fields."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class StageConfig(BaseModel):
    """Base of every stage config: unknown fields are errors, values are immutable.

    `RUNTIME` names the fields that change how a stage runs but not what it writes (device,
    workers, progress bars); they are left out of the fingerprint.
    """

    # allow_inf_nan=False: a NaN or infinite float is an error naming its field, here at the edge.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
    RUNTIME: ClassVar[frozenset[str]] = frozenset()

    def content(self) -> dict[str, Any]:
        """The fields that determine the stage's outputs (what the fingerprint hashes)."""
        return self.model_dump(mode="json", exclude=set(self.RUNTIME))


def describe_validation_error(e: ValidationError, where: str) -> str:
    """One line per invalid parameter: `where.field: message (got value)`."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        lines.append(f"{where}.{loc}: {err['msg']} (got {got!r})" if loc else f"{where}: {err['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(cls: type[StageConfig], values: dict[str, Any], where: str) -> Any:
    """Build a config, turning pydantic's error into a short message naming each bad parameter."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, where)) from None
