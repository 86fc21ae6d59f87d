"""Bad `pcm` command lines: exit code 2 and one line `error: ...` naming the argument, the file or the key.

Every case stops before any stage work (a missing input, a bad value, a bad preset), so the file takes a
few seconds; the `--set` grammar itself is covered by tests/test_cli_errors.py and
tests/test_bad_inputs_config.py.
"""

from __future__ import annotations

import re
import sys

import pytest


def run_pcm(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`pcm ARGS` through the real entry point (pcm.cli.run): (exit code, stderr)."""
    from pcm import cli

    monkeypatch.setattr(sys, "argv", ["pcm", *args])
    with pytest.raises(SystemExit) as e:
        cli.run()
    return e.value.code, capsys.readouterr().err


# (args, parts of the one error line); "{tmp}" is the test's folder, the working directory of the command.
CASES = [
    (["ingest", "{tmp}/nosuch.txt"], ["nosuch.txt"]),
    (["ingest", "{tmp}/caps.txt", "--set", "format=yaml"], ["--set format=yaml", "Input should be 'auto'"]),
    (["ingest", "{tmp}/caps.txt", "--set", "subset=0"], ["--set subset=0", "greater than or equal to 1"]),
    (["ingest", "{tmp}/caps.txt", "--set", "fraction=1.5"], ["--set fraction=1.5", "less than or equal to 1"]),
    (["ingest", "{tmp}/caps.txt", "--set", "dedup=1"], ["--set dedup=1", "expected true or false, got 1"]),
    (["ingest", "{tmp}/caps.txt", "--set", "max_chars=true"], ["--set max_chars=true", "got the boolean true"]),
    (["ingest", "{tmp}/caps.txt", "--set", "default_split=dev"], ["--set default_split=dev", "'train', 'val' or"]),
    (["ingest", "{tmp}/empty.txt", "--root", "{tmp}/runs"], ["empty.txt: no captions in the file"]),
    (["ingest", "{tmp}/caps.txt", "--root", "file://{tmp}/runs"], ["--root file://", "not a file: URL"]),
    (["ingest", "{tmp}/caps.txt", "--root", "{tmp}/caps.txt"], ["caps.txt"]),
    (["synthesize", "--captions", "{tmp}/nosuch", "--root", "{tmp}/runs"],
     ["nosuch: not a finished stage directory"]),
    (["synthesize", "--captions", "{tmp}", "--root", "{tmp}/runs"], ["not a finished stage directory"]),
    (["synthesize", "--captions", "c", "--set", "steps=0"], ["--set steps=0", "greater than or equal to 1"]),
    (["synthesize", "--captions", "c", "--set", "scheduler=os.system"], ["unknown scheduler 'os.system'"]),
    (["synthesize", "--captions", "c", "--set", "compile=yes"], ["--set compile=yes", "expected true or false"]),
    (["encode", "--captions", "{tmp}/nosuch", "--shards", "{tmp}/nosuch2", "--root", "{tmp}/runs"],
     ["not a finished stage directory"]),
    (["encode", "--captions", "c", "--shards", "s", "--set", "clip.pool=true"],
     ["--set clip.pool=true", "got the boolean true"]),
    (["encode", "--captions", "c", "--shards", "s", "--set", "clip.precision=fp8"], ["--set clip.precision=fp8"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "epochs=true"], ["--set epochs=true", "boolean true"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "cxe=1"], ["--set cxe=1", "expected true or false"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "model.top_k=true"], ["model.top_k", "boolean true"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "betas=[0.9, 1.0]"], ["betas", "must be in [0, 1)"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "preset=../x"], ["model preset '../x' not found"]),
    (["evaluate", "--train", "t", "--encode", "e", "--captions", "c", "--set", "beam_size=0"],
     ["--set beam_size=0", "greater than or equal to 1"]),
    (["evaluate", "--train", "t", "--encode", "e", "--captions", "c", "--set", "checkpoint=last"],
     ["--set checkpoint=last", "'best' or 'latest'"]),
    (["run", "--preset", "nosuch-preset", "--show-config"], ["unknown preset 'nosuch-preset'"]),
    (["run", "--preset", "{tmp}/bad.toml", "--show-config"], ["bad.toml: invalid TOML"]),
    (["run", "--show-config", "--set", "train.cxe=0"], ["--set train.cxe=0", "expected true or false, got 0"]),
    (["run", "--show-config", "--set", "encode.clip.model=3"], ["encode.clip.model", "valid string"]),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, parts", CASES, ids=[" ".join(a).replace("{tmp}/", "").replace("{tmp}", "tmp") for a, _ in CASES])
def test_a_bad_command_line_is_one_error_line_naming_it(monkeypatch, capsys, tmp_path, args, parts):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caps.txt").write_text("a dog on the grass\na cat on a sofa\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.toml").write_text("[train\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--root" not in args and args[0] != "run":
        args += ["--root", str(tmp_path / "runs")]
    code, err = run_pcm(monkeypatch, capsys, *args)
    # Progress bars and the stage's own summary may precede it (a bar ends with \r); the error is one line.
    errors = [line.strip() for line in re.split(r"[\r\n]+", err) if line.strip().startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in errors[0], (part, errors[0])
    assert not list((tmp_path / "runs").rglob("stage.done.json"))
