"""What the CLI commands share: the bundled pipeline presets (read as data), the output-folder check, and
`--set KEY=VALUE` (one grammar for every command, pcm.config's) with the --help it generates."""

from __future__ import annotations

import importlib
import os
import shlex
import tempfile
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import typer
from typer.core import TyperCommand

from pcm import bundled
from storage import publish, remote
from storage.layout import STAGES  # storage imports no torch: the CLI stays light

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import NoSuchOption
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import NoSuchOption

def pipeline_preset_files() -> list[Path]:
    """The bundled pipeline presets' TOML files, read here as data: listing them must not import
    pcm.stages.pipeline (torch, diffusers, ...)."""
    return [bundled.path("pipeline", ".toml", name) for name in bundled.names("pipeline", ".toml")]


def pipeline_presets() -> dict[str, str]:
    """Bundled pipeline preset name -> its `description`, straight from pcm/presets/pipeline/*.toml."""
    out: dict[str, str] = {}
    for path in pipeline_preset_files():
        with open(path, "rb") as f:
            out[path.stem] = str(tomllib.load(f).get("description", ""))
    return out


def _blocker(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or `path`) when it is not a folder, else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def writable_dir(path: str | os.PathLike, option: str = "--root") -> Path:
    """Create the output folder `path` (given as `option`) if needed and check that files can be made in it.

    Every failure is a ValueError naming the folder and what to do, raised before any work starts
    (a read-only root would otherwise end a stage with an OSError traceback, possibly hours in).
    An object-store URL is probed in the store (storage.publish.check_writable); its working copy is returned.
    """
    if remote.is_url(path):
        publish.check_writable(str(path), option)
        return remote.local_root(str(path))
    if str(path).startswith("file:"):  # Path("file:///x") would be the relative folder ./file:/x
        raise ValueError(f"{option} {path}: give a local folder as a path (/{str(path)[5:].lstrip('/')}), "
                         "not a file: URL")
    folder = Path(path).expanduser()
    fix = f"choose a writable {option}"
    if blocker := _blocker(folder):
        raise ValueError(f"cannot use {option} {folder}: {blocker} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {option} {folder}: {e.strerror or e}; {fix}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write to {option} {folder}: permission denied; {fix}")
    try:  # access() can say yes where a write still fails (read-only mounts, ACLs, network file systems)
        fd, probe = tempfile.mkstemp(prefix=".pcm-write-check-", dir=folder)
    except OSError as e:
        raise ValueError(f"cannot write to {option} {folder}: {e.strerror or e}; {fix}") from None
    os.close(fd)
    os.unlink(probe)
    return folder


# ------------------------------------------------------------------ --set KEY=VALUE on every command
VALUE_SYNTAX = ("VALUE is TOML: 4, 1e-4, true, \"text\", [\"val\", \"test\"], {pcm = false}; a bare word is text; "
                "none (or null) unsets an optional field")
SET_HELP = "Set a config field: KEY=VALUE, repeatable; the keys are listed below. " + VALUE_SYNTAX + "."
# Old option names whose --set key is spelt otherwise (e.g. --no-progress -> progress_bar=false).
RENAMED = {"progress": "progress_bar", "clip": "clip.model", "vocabulary": "vocabulary_file"}
Row = tuple[str, str, str]
CONFIG_TITLE = "Config: --set KEY=VALUE"
# pcm.config (pydantic) is imported inside the functions: `pcm --help` and `pcm presets` stay fast.


def config_class(stage: str) -> Any:
    """A stage's config class, imported only when needed (pcm.stages.train and .encode import torch)."""
    return getattr(importlib.import_module(f"pcm.stages.{stage}"), f"{stage.capitalize()}Config")


def _set_keys(items: Sequence[str]) -> dict[str, str]:
    """--set key -> the KEY=VALUE the user typed (the last one of a key, as the parse keeps)."""
    return {item.partition("=")[0].strip(): item for item in items}


def check_sets(cls: Any, items: Sequence[str], *, prefix: str = "", given_by: dict[str, str] | None = None,
               example: str = "steps=4") -> dict[str, Any]:
    """The dotted --set overrides of one config class, every key checked: an unknown key, or one an
    option gives, is one line naming it (and the valid keys)."""
    from pcm.config import parse_assignments, unknown_key

    overrides = parse_assignments(items, example=example)
    typed = _set_keys(items)
    for key, value in overrides.items():
        if why := unknown_key(cls, key, value, prefix):
            raise ValueError(f"--set {typed[key]}: {why}")
        top = key.split(".")[0]
        if given_by and top in given_by:
            raise ValueError(f"--set {typed[key]}: {top} is given by {given_by[top]}, not by --set")
    return overrides


def stage_values(cls: Any, items: Sequence[str], given_by: dict[str, str] | None = None,
                 example: str = "steps=4") -> dict[str, Any]:
    """The values a stage command's --set gives its config class (nested: model.d_model -> {model: {d_model}})."""
    from pcm.config import set_dotted

    return set_dotted({}, check_sets(cls, items, given_by=given_by, example=example))


def _described(err: dict[str, Any], loc: str, item: str | None, where: str, exact: bool) -> str:
    from pcm.config import parse_value, problem, problem_line

    if item is None:
        return problem_line(err, where)
    msg = problem(err)
    text = item.partition("=")[2]
    at = "" if exact else f" (at {where}.{loc})" if loc else f" ({where})"
    if text.strip()[:1] in "[{" and parse_value(text) == text:
        at += "; it is not TOML, so it was read as text: quote the strings inside, e.g. [\"val\", \"test\"]"
    return f"--set {item}: {msg}{at}"


def build_config(cls: Any, values: dict[str, Any], where: str, items: Sequence[str] = (), prefix: str = "") -> Any:
    """cls(values) as pcm.config.validate builds it; an invalid value is one line, naming the --set that gave it.

    `items` are the --set KEY=VALUE given; `prefix` what their keys start with (`train.` for `pcm run`)."""
    from pydantic import ValidationError

    from pcm.config import describe_validation_error

    try:
        return cls.model_validate(values)
    except ValidationError as e:
        typed = {k.removeprefix(prefix) if k.startswith(prefix) else "": item for k, item in _set_keys(items).items()}
        by_length = sorted(typed, key=len, reverse=True)

        def line(err: dict[str, Any]) -> str:
            loc = ".".join(str(p) for p in err["loc"])
            key = next((k for k in by_length if not k or loc == k or loc.startswith(f"{k}.")
                        or (loc and k.startswith(f"{loc}."))), None)
            return _described(err, loc, None if key is None else typed[key], where, bool(key) and key == loc)

        raise ValueError(describe_validation_error(e, where, one_line=True, line=line)) from None


def _annotation(cls: Any, dotted: str) -> Any:
    from pcm.config import table_model

    model, ann = cls, None
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = table_model(ann)
    return ann


def _set_for(opt: str, args: Sequence[str], schemas: dict[str, Any]) -> list[str]:
    """The --set items that say what option `opt` of `args` meant (`--steps 4` -> --set steps=4); several where
    it names a field of several stages (`pcm run --device`), none where it names no config field."""
    from pcm.config import field_rows

    name = opt.lstrip("-")
    negated = name.startswith("no-")
    found: list[tuple[str, Any]] = []
    for plain in ((name[3:], name) if negated else (name,)):
        field = RENAMED.get(plain, plain.replace("-", "_"))
        for prefix, cls in schemas.items():
            keys = [k for k, _, _ in field_rows(cls)]
            matches = [k for k in keys if k == field] or [k for k in keys if k.split(".")[-1] == field]
            found += [(f"{prefix}{k}", _annotation(cls, k)) for k in matches[:1]]
        if found:
            negated = negated and plain != name
            break
    value = None
    for i, arg in enumerate(args):
        if arg == opt and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
        elif arg.startswith(f"{opt}="):
            value = arg.partition("=")[2]
    sets = []
    for key, ann in found:
        if ann is bool or "bool" in str(ann):
            text = "false" if negated else (value if value in ("true", "false") else "true")
        else:
            text = value if value is not None else "VALUE"
        sets.append(f"--set {shlex.quote(f'{key}={text}')}")
    return sets


def removed_option_hint(opts: Sequence[str], args: Sequence[str], schemas: dict[str, Any], command: str) -> str | None:
    """`pcm synthesize --steps 4`: the --set that says it (`--set steps=4`), when `--steps` names a config field;
    every such option of `opts` (the unknown ones, in order) is named at once."""
    told = []
    for opt in opts:
        sets = _set_for(opt, args, schemas)
        if sets:
            told.append((opt, sets[0] if len(sets) == 1 else f"one of {', '.join(sets)}"))
    if not told:
        return None
    return (f"`pcm {command}` has no option {', '.join(o for o, _ in told)}: config fields are set with --set "
            f"KEY=VALUE; use {' '.join(s for _, s in told)} (`pcm {command} --help` lists every key)")


class ConfigCommand(TyperCommand):
    """A command whose config fields are set with --set KEY=VALUE: its --help lists them (key, default,
    description, from the config's pydantic fields, imported only then), and an option that is a config
    field (`--steps 4`) is told the --set that says it."""

    stage: ClassVar[str | None] = None  # None: `pcm run`, whose keys are SECTION.KEY of every stage
    given_by: ClassVar[dict[str, str]] = {}  # a field an argument or option gives -> that argument or option
    # Adjusts the generated rows; a dict is several panels (title -> rows).
    row_hook: ClassVar[Callable[[list[Row]], list[Row] | dict[str, list[Row]]] | None] = None

    def schemas(self) -> dict[str, Any]:
        if self.stage is None:
            return {f"{s}.": config_class(s) for s in STAGES}
        return {"": config_class(self.stage)}

    def config_panels(self) -> dict[str, list[Row]]:
        """--help's --set keys: panel title -> (key, default, description) rows, from the config's fields."""
        from pcm.config import REQUIRED, field_rows

        if self.stage is None:
            return {}
        rows = [(k, f"({self.given_by[k]})" if k in self.given_by and d == REQUIRED else d,
                 f"{t} (given by {self.given_by[k]}, not --set)" if k in self.given_by else t)
                for k, d, t in field_rows(config_class(self.stage))]
        hook = type(self).row_hook
        out = hook(rows) if hook is not None else rows
        return out if isinstance(out, dict) else {CONFIG_TITLE: out}

    def config_rows(self) -> list[Row]:
        return [row for rows in self.config_panels().values() for row in rows]

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)  # click consumes `args` as it parses
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as e:
            if not _set_for(e.option_name, given, self.schemas()):
                raise
            known = {o for p in self.params for o in (*p.opts, *p.secondary_opts)}
            unknown = dict.fromkeys(a.partition("=")[0] for a in given if a.startswith("--") and a != "--"
                                    and a.partition("=")[0] not in known)
            names, c = [], ctx
            while c.parent is not None:  # `synthesize`, whatever the program is called (pcm, python -m ...)
                names.append(c.info_name)
                c = c.parent
            hint = removed_option_hint(list(unknown), given, self.schemas(), " ".join(reversed(names)) or str(self.name))
            raise ValueError(hint) from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        epilog, self.epilog = self.epilog, None
        try:
            super().format_help(ctx, formatter)
        finally:
            self.epilog = epilog
        panels = self.config_panels()
        try:
            from typer import rich_utils
            from typer.core import HAS_RICH
        except ImportError:  # pragma: no cover
            HAS_RICH = False
        if not HAS_RICH or self.rich_markup_mode is None:
            for title, rows in panels.items():
                with formatter.section(title):
                    if title == CONFIG_TITLE:
                        formatter.write_text(VALUE_SYNTAX + ".")
                    formatter.write_dl([(k, f"{t} [default: {d}]".lstrip()) for k, d, t in rows])
            self.format_epilog(ctx, formatter)
            return
        from rich.console import Group
        from rich.padding import Padding
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        # typer's own console and epilogue layout (private helpers; plain rich where a typer lacks them)
        console = getattr(rich_utils, "_get_rich_console", lambda: None)() or __import__("rich.console").console.Console()
        for title, rows in panels.items():
            table = Table(highlight=True, show_header=True, box=None, pad_edge=False, padding=(0, 1),
                          header_style="dim")
            table.add_column("key", style="bold cyan", no_wrap=True)
            table.add_column("default", no_wrap=True, overflow="fold")
            table.add_column("description")
            for key, default, text in rows:
                table.add_row(key, default, text)
            body = Group(Text(VALUE_SYNTAX + ".", style="dim"), table) if title == CONFIG_TITLE else table
            console.print(Panel(body, title=title, title_align="left", border_style="dim"))
        if epilog:
            try:
                text = rich_utils._fix_linebreaks(epilog.split("\n\n"), self.rich_markup_mode)
                body = rich_utils._make_rich_text(text=text, markup_mode=self.rich_markup_mode)
            except (AttributeError, TypeError):  # pragma: no cover - another typer
                body = Text(epilog)
            console.print(Padding(body, 1))


def config_command(stage: str | None, *, given_by: dict[str, str] | None = None,
                   rows: Callable[[list[Row]], list[Row] | dict[str, list[Row]]] | None = None) -> type[ConfigCommand]:
    """The command class of one `pcm` command (`cls=` of app.command)."""
    attrs: dict[str, Any] = {"stage": stage, "given_by": given_by or {}}
    if rows is not None:
        attrs["row_hook"] = staticmethod(rows)
    return type(f"{(stage or 'run').capitalize()}Command", (ConfigCommand,), attrs)


def set_option() -> Any:
    return typer.Option([], "--set", "-s", help=SET_HELP, metavar="KEY=VALUE")
