"""Typed stage configs: validated once at the edge, split into content fields and runtime fields."""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

# What stands in a fingerprinted config for a path identified by its content instead (a model directory's
# digest, an image root's manifest, a file's sha256: the stage's plan adds that identity beside it).
BY_CONTENT = "(identified by content)"


def strict_scalars(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A field validator (mode="before") for every config model: a boolean is no number and only a boolean is one.

    pydantic takes true as 1 for an int field (`--set train.epochs=true` trained one epoch) and 1, 0, "yes"
    or "off" as a bool (`--set train.cxe=0`): both are refused, naming the field.
    """
    args = set(_union_args(cls.model_fields[info.field_name].annotation))
    if isinstance(value, bool) and bool not in args and {int, float} & args:
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    if bool in args and value is not None and not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


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

    _scalars = field_validator("*", mode="before")(strict_scalars)


def problem(err: dict[str, Any]) -> str:
    """What one pydantic error says, without pydantic's `Value error, ` before a validator's own message."""
    return str(err["msg"]).removeprefix("Value error, ")


def problem_line(err: dict[str, Any], where: str, show: Callable[[Any], str] = repr) -> str:
    """`where.field: message (got value)`: how every config error names one invalid parameter."""
    loc = ".".join(str(p) for p in err["loc"])
    return f"{where}.{loc}: {problem(err)} (got {show(err.get('input'))})" if loc else f"{where}: {problem(err)}"


def validation_problems(e: ValidationError, where: str, show: Callable[[Any], str] = repr,
                        line: Callable[[dict[str, Any]], str] | None = None) -> list[str]:
    """One line per invalid parameter: `problem_line`, or `line(err)` where the caller knows more of what gave
    the value (a `pcm` command names the `--set` that gave it)."""
    return [line(err) if line else problem_line(err, where, show) for err in e.errors()]


def describe_validation_error(e: ValidationError, where: str, *, one_line: bool = False,
                              line: Callable[[dict[str, Any]], str] | None = None) -> str:
    """The message of an invalid stage config, one entry per invalid parameter (`validation_problems`): a line
    each under `invalid config:`, or (`one_line`, what a `pcm` stage command prints) `invalid <where> config: a; b`."""
    problems = validation_problems(e, where, line=line)
    if one_line:
        return f"invalid {where} config: " + "; ".join(problems)
    return "invalid config:\n  " + "\n  ".join(problems)


def validate(cls: type[StageConfig], values: dict[str, Any], where: str) -> Any:
    """Build a config, turning pydantic's error into a short message naming each bad parameter."""
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise ValueError(describe_validation_error(e, where)) from None


# ------------------------------------------------------------------ `--set KEY=VALUE`: one grammar, every command
# `pcm run --set train.epochs=2` (SECTION.KEY) and `pcm train --set epochs=2` (the stage's own KEY, dotted into
# tables: model.d_model=256, clip.pool=4) parse the same way; flows and presets pass the same dotted keys.
NONE_WORDS = frozenset({"none", "null"})
# What `--help` shows for a field without a default (the command gives it as an argument or option).
REQUIRED = "(required)"


def parse_value(text: str) -> Any:
    """One `--set` value: TOML value syntax (2, 1e-4, true, "text", [1, 2], {pcm = false}); the bare word
    none or null is None (TOML has no null: quote it, "none", for the text); anything else is the text itself
    (a bare word is a string)."""
    if text.strip() in NONE_WORDS:
        return None
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    value = doc["v"]
    if len(doc) != 1 or isinstance(value, datetime.date | datetime.time):
        return text  # a second line of TOML, or a date: no config field takes one, the text is meant
    return value


def parse_assignments(items: Iterable[str], example: str = "train.epochs=2") -> dict[str, Any]:
    """`["train.epochs=2", "synthesize.negative_prompt=blurry"]` -> {"train.epochs": 2, ...} (see parse_value)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(part.strip() for part in key.split(".")):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {example}")
        out[key] = parse_value(text)
    return out


def merge_tables(old: Any, new: Any) -> Any:
    """A table set onto a table updates it key by key (recursively); anything else replaces."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: merge_tables(old.get(k), v) for k, v in new.items()}}
    return new


def set_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with each dotted key (`clip.pool`) set; a table value merges into the table it replaces."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted!r}: {p!r} is not a section")
        node[parts[-1]] = merge_tables(node.get(parts[-1]), copy.deepcopy(value))
    return out


def _union_args(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    return typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)


def table_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (`ClipSpec`, also from `ClipSpec | None`), else None."""
    for arg in _union_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _free_table(annotation: Any) -> bool:
    """A `dict[str, ...]` field: any key (its own validator names the bad ones, e.g. train.model)."""
    return any(arg is dict or typing.get_origin(arg) is dict for arg in _union_args(annotation))


def unknown_key(schema: type[BaseModel], dotted: str, value: Any = None, prefix: str = "") -> str | None:
    """Why `dotted` names no field of `schema` (the first unknown part, with the valid keys), else None.

    `prefix` is what the user typed before `dotted` (`train` for `pcm run --set train.lrr=1`); a table value
    (`clip={pol = 4}`) has its own keys checked the same way.
    """
    model: type[BaseModel] | None = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return None
        base = ".".join(p for p in (prefix, *parts[:i]) if p)
        path = f"{base}.{part}" if base else part
        fields = model.model_fields
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=1)
            mean = f" (did you mean {f'{base}.{near[0]}' if base else near[0]!r}?)" if near else ""
            return (f"unknown key {path!r}{mean}; valid keys{f' of {base}' if base else ''}: "
                    + ", ".join(f"{base}.{f}" if base else f for f in fields))
        annotation = fields[part].annotation
        sub = table_model(annotation)
        if i < len(parts) - 1 and sub is None and not _free_table(annotation):
            return f"{path!r} is not a table: set it whole, {path}=VALUE"
        model = sub
    if isinstance(value, dict) and model is not None:
        here = ".".join(p for p in (prefix, dotted) if p)
        for k, v in value.items():
            if why := unknown_key(model, str(k), v, here):
                return why
    return None


def toml_text(value: Any, top: bool = True) -> str:
    """`value` as a `--set` value would spell it: 2, 1e-08, true, none, ["train", "val"], {pcm = false}; a
    string bare where it reads back as itself (text, paths), else quoted."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return value if top and value and parse_value(value) == value else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_text(v, top=False) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_text(v, top=False)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _choices(annotation: Any) -> list[str]:
    out: list[str] = []
    for arg in _union_args(annotation):
        if typing.get_origin(arg) is typing.Literal:
            out += [toml_text(v) for v in typing.get_args(arg)]
    return out


def field_rows(cls: type[BaseModel], prefix: str = "", default: Any = None) -> list[tuple[str, str, str]]:
    """(`--set` key, default as a `--set` value, description) for every field of `cls`, a table of another
    model spelt out as its own keys (`clip.model`, `clip.pool`, ...), in the class's order.

    `default` is the instance whose values are the defaults of a nested table (the field's default_factory).
    """
    rows: list[tuple[str, str, str]] = []
    for name, f in cls.model_fields.items():
        key = f"{prefix}{name}"
        if default is not None:
            value: Any = getattr(default, name)
        elif f.is_required():
            value = REQUIRED
        else:
            value = f.get_default(call_default_factory=True)
        sub = table_model(f.annotation)
        if sub is not None and isinstance(value, sub):
            rows += field_rows(sub, f"{key}.", value)
            continue
        text = (f.description or "").strip()
        choices = _choices(f.annotation)
        if choices and not all(c in text for c in choices):
            text = f"{text} (one of {', '.join(choices)})" if text else f"one of {', '.join(choices)}"
        rows.append((key, value if value == REQUIRED else toml_text(value), text))
    return rows
