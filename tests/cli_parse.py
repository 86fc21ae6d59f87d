"""Whether `pcm ARGS` parses with the real click commands: the check the README tests and the CLI's --help
examples share (tests/test_readme_commands.py, tests/test_cli_ux.py)."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from pcm.cli import app

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import UsageError


def split_redirect(words: list[str]) -> tuple[list[str], str | None]:
    if ">" in words:
        i = words.index(">")
        return words[:i], words[i + 1]
    return words, None


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


def leaf(args: list[str]) -> tuple[Any, list[str], list[str]]:
    """The click command `pcm ARGS` reaches, the sub-command path, and the arguments left for it."""
    cmd = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(cmd.context_class(cmd), rest[0])
        assert sub is not None, f"`pcm {' '.join(args)}`: no sub-command {rest[0]!r} (have {sorted(cmd.commands)})"
        path.append(rest.pop(0))
        cmd = sub
    return cmd, path, rest


def check_pcm_parses(args: list[str]) -> None:
    """click parses `pcm ARGS` as written: unknown commands, options or values are errors here."""
    cmd, path, rest = leaf(args)
    if "--help" in rest or (is_group(cmd) and not rest):
        return
    if is_group(cmd):  # only top-level options, e.g. `pcm --version`
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        assert all(a in known for a in rest), f"`pcm {' '.join(args)}`: unknown option(s) of pcm"
        return
    try:
        cmd.make_context(f"pcm {' '.join(path)}", list(rest))
    except UsageError as e:
        pytest.fail(f"`pcm {' '.join(args)}` does not parse: {e.format_message()}")
