"""Every shell command of README.md's ```bash blocks works as written.

`pcm ...` lines are parsed by the real click commands (the sub-command exists, every option exists and
takes the values given, required options are there); the cheap ones run for real (`--help`, `presets`,
`--version`, `world check`, and every `pcm run` with `--show-config` added, which resolves its preset
and overrides without running a stage), in order, in a scratch folder, honouring `> file`. `make`
lines name a Makefile target, `python` lines a script (or `python -m` a module) holding each option given;
`prefect`/`export`/`mkdir` lines only have to split into words, `source` lines name the virtualenv's activate script.
The Prefect block ("With Prefect") runs for real in bash, as written, up to its flow run
(`test_the_readme_prefect_block_runs_as_written`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cli_parse import check_pcm_parses, leaf, split_redirect
from typer.testing import CliRunner

from pcm.cli import app

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
ONLY_PLAUSIBLE = {"prefect", "export", "mkdir"}
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
        elif words[0] == "python" and words[1] == "-m":
            module = REPO / (words[2].replace(".", "/") + ".py")
            assert module.is_file(), shlex.join(words)
            source = module.read_text(encoding="utf-8")
            for option in (w.split("=")[0] for w in words[3:] if w.startswith("--")):
                assert f'"{option}"' in source, f"{shlex.join(words)}: {module.name} has no {option}"
        elif words[0] == "source":
            assert words[1:] == [".venv/bin/activate"], shlex.join(words)  # what `make setup` creates
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


def prefect_block() -> str:
    blocks = [b for b in bash_blocks(README.read_text(encoding="utf-8")) if "prefect server start" in b]
    assert len(blocks) == 1, blocks
    return blocks[0]


def api(port: int, path: str, body: dict | None = None) -> int:
    """The HTTP status of GET (or POST `body` to) the server's `path` (a POST answering an empty list: 404)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status if body is None else (r.status if json.loads(r.read()) else 404)
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.heavy
def test_the_readme_prefect_block_runs_as_written(tmp_path):
    """README's "With Prefect" block, pasted into bash (`bash -e`: any failing line fails the test) as written, up
    to its flow run: it activates `.venv`, starts the server and waits until it answers before the next command,
    creates the pool and the `gpu` limit, deploys and starts a worker. The last line (`python -m flows.follow
    synth-and-train/demo`, the whole demo, minutes) is left out: the test checks instead that the deployments,
    the limit and a polling worker exist. Only the environment differs from a reader's terminal: `PORT` (which
    the block honours) is a free port, PREFECT_HOME a scratch folder, and the checkout is a folder of links to
    this one whose `.venv` is the running interpreter's environment. Everything started is stopped after."""
    from prefect_server import _group_alive

    from flows.local_server import free_port

    block = prefect_block()
    lines = block.splitlines()
    last = max(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert lines[last].startswith("python -m flows.follow synth-and-train/demo"), lines[last]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in {".venv", ".prefect", "runs", ".git"}:
            (checkout / entry.name).symlink_to(entry)
    (checkout / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PORT=str(port), PREFECT_HOME=str(tmp_path / "home"), PWD=str(checkout),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "block.log"
    with open(log, "wb") as out:
        shell = subprocess.Popen(["bash", "-e", "-c", "\n".join(lines[:last])], cwd=checkout, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = shell.wait(600)
        assert rc == 0, log.read_text(errors="replace")[-4000:]
        assert api(port, "/deployments/name/synth-and-train/demo") == 200
        assert api(port, "/deployments/name/synth-and-train/coco-vitl14") == 200
        assert api(port, "/concurrency_limits/tag/gpu") == 200
        deadline = time.monotonic() + 120
        while api(port, "/work_pools/local-process/workers/filter", {}) != 200:  # its first heartbeat
            assert time.monotonic() < deadline, (checkout / ".prefect" / "worker.log").read_text(errors="replace")
            time.sleep(1)
    finally:
        # Non-interactive bash runs `&` jobs in its own process group: the server and the worker.
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(shell.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _group_alive(shell.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_alive(shell.pid):
                break
        shell.wait(10)


def test_the_real_run_guide_pcm_commands_parse_and_resolve():
    """docs/real-run.md's `pcm run` commands parse and resolve (preset and overrides), as the README's do."""
    guide = (REPO / "docs" / "real-run.md").read_text(encoding="utf-8")
    runs = [w for block in bash_blocks(guide) for w in shell_commands(block) if w[:2] == ["pcm", "run"]]
    assert runs, "no pcm run command in docs/real-run.md"
    for words in runs:
        check_pcm_parses(words[1:])
        res = CliRunner().invoke(app, [*words[1:], "--show-config"])
        assert res.exit_code == 0, (shlex.join(words), res.output, res.exception)
    assert "deploy/k8s-gpu-job-template.json" in guide and (REPO / "deploy" / "k8s-gpu-job-template.json").is_file()
