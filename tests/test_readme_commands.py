"""Every shell command of README.md's ```bash blocks works as written.

`pcm ...` lines are parsed by the real click commands (the sub-command exists, every option exists and
takes the values given, required options are there); the cheap ones run for real (`--help`, `presets`,
`--version`, `world check`, and every `pcm run` with `--show-config` added, which resolves its preset
and overrides without running a stage), in order, in a scratch folder, honouring `> file`. `make`
lines name a Makefile target, `python` lines a script holding each option given; `prefect`/`export`
lines only have to split into words.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pcm.cli import app

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import UsageError

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ONLY_PLAUSIBLE = {"prefect", "export"}
# Sub-commands cheap enough to run for real (well under 20 s on 2 cores).
CHEAP = {("presets",), ("world", "check")}


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str) -> list[list[str]]:
    """One word list per command: continuations joined, comments, env assignments and a trailing & removed."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words and words[-1] == "&":
            words = words[:-1]
        if words:
            out.append(words)
    return out


def readme_commands() -> list[list[str]]:
    return [words for block in bash_blocks(README.read_text(encoding="utf-8")) for words in shell_commands(block)]


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


def test_the_readme_has_bash_blocks_with_pcm_commands():
    commands = readme_commands()
    assert sum(w[0] == "pcm" for w in commands) >= 8, commands


@pytest.mark.parametrize("words", [w for w in readme_commands() if w[0] == "pcm"], ids=shlex.join)
def test_every_readme_pcm_command_parses(words):
    check_pcm_parses(split_redirect(words)[0][1:])


def test_the_cheap_readme_pcm_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `> file` lands here, and nothing is written into the checkout
    ran = []
    for words in readme_commands():
        if words[0] != "pcm":
            continue
        args, out = split_redirect(words[1:])
        _, path, rest = leaf(args)
        if "--help" in rest or args == ["--version"] or tuple(path) in CHEAP:
            run = args
        elif path == ["run"]:
            run = args if "--show-config" in args else [*args, "--show-config"]
        else:
            continue
        res = CliRunner().invoke(app, run)
        assert res.exit_code == 0, (shlex.join(words), res.output, res.exception)
        assert res.stdout.strip(), shlex.join(words)
        if out:
            Path(out).write_text(res.stdout, encoding="utf-8")
        ran.append(shlex.join(words))
    assert any("presets" in r for r in ran) and any("--show-config" in r for r in ran), ran


def test_readme_make_and_python_lines_name_what_exists():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M))
    for words in readme_commands():
        if words[0] == "make":
            assert set(words[1:]) <= targets, (shlex.join(words), sorted(targets))
        elif words[0] == "python":
            script = REPO / words[1]
            assert script.is_file(), shlex.join(words)
            source = script.read_text(encoding="utf-8")
            for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
                assert f'"{option}"' in source, f"{shlex.join(words)}: {script.name} has no {option}"
        else:
            assert words[0] in ONLY_PLAUSIBLE | {"pcm"}, f"no check for README command {shlex.join(words)!r}"


def test_the_readme_ablation_commands_resolve():
    """The `pcm run ...` of the README's tables and prose (inline code): each preset and override resolves."""
    spans = re.findall(r"`(pcm run [^`]*)`", README.read_text(encoding="utf-8"))
    assert len(spans) >= 4, spans
    for span in spans:
        args = shlex.split(span)[1:]
        check_pcm_parses(args)
        res = CliRunner().invoke(app, [*args, "--show-config"])
        assert res.exit_code == 0, (span, res.output, res.exception)
