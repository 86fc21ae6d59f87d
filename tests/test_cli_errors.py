"""`pcm` on an unwritable output root, OS errors and too deeply nested JSON: one clear line and exit code 2,
never a traceback; every stage command checks its --root before any work."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pcm.cli import app


def run_pcm(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`pcm ARGS` through the real entry point (pcm.cli.run): (exit code, stderr)."""
    from pcm import cli

    monkeypatch.setattr(sys, "argv", ["pcm", *args])
    with pytest.raises(SystemExit) as e:
        cli.run()
    return e.value.code, capsys.readouterr().err


def assert_one_clean_line(err: str, *parts: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.fixture
def under_a_file(tmp_path) -> Path:
    """A --root below a regular file: no one can create it, root included."""
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path / "a_file" / "runs"


@pytest.fixture
def captions_txt(tmp_path) -> Path:
    path = tmp_path / "caps.txt"
    path.write_text("a dog on the grass\na cat on a sofa\n")
    return path


def test_run_with_a_root_below_a_file_is_one_line_naming_it(monkeypatch, capsys, under_a_file):
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(under_a_file))
    assert code == 2
    assert_one_clean_line(err, f"--root {under_a_file}", f"{under_a_file.parent} is a file, not a folder",
                          "choose a writable --root")
    res = CliRunner().invoke(app, ["run", "ingest", "--root", str(under_a_file)])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)
    assert str(under_a_file) in str(res.exception)


def test_run_with_a_read_only_root_is_one_line_naming_it(monkeypatch, capsys, tmp_path):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0555 folder stays writable (see the os.access test below)")
        code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(ro / "runs"))
        assert code == 2
        assert_one_clean_line(err, str(ro / "runs"), "choose a writable --root")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_a_root_access_denies_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    import pcm.stages.pipeline

    root = tmp_path / "runs"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == root else real_access(p, mode, **kw))
    monkeypatch.setattr(pcm.stages.pipeline, "run_pipeline", lambda *a, **k: pytest.fail("ran despite the root"))
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(root))
    assert code == 2
    assert_one_clean_line(err, f"cannot write to --root {root}: permission denied", "choose a writable --root")


def test_a_root_where_no_file_can_be_made_is_refused(monkeypatch, capsys, tmp_path):
    """os.access can say yes where writes fail (a read-only mount, ACLs): a probe file must be made."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"cannot write to --root {tmp_path / 'runs'}: Read-only file system")


@pytest.mark.parametrize("command", ["ingest", "synthesize", "encode", "train", "evaluate"])
def test_every_stage_command_checks_its_root_first(monkeypatch, capsys, under_a_file, captions_txt, command):
    elsewhere = str(under_a_file.parent.parent / "x")  # stage inputs: never read, the root is refused first
    args = {"ingest": [str(captions_txt)],
            "synthesize": ["--captions", elsewhere],
            "encode": ["--captions", elsewhere, "--shards", elsewhere],
            "train": ["--captions", elsewhere, "--encode", elsewhere],
            "evaluate": ["--train", elsewhere, "--encode", elsewhere, "--captions", elsewhere]}[command]
    code, err = run_pcm(monkeypatch, capsys, command, *args, "--root", str(under_a_file))
    assert code == 2
    assert_one_clean_line(err, f"--root {under_a_file}", "is a file, not a folder", "choose a writable --root")


def test_caption_checks_its_out_folder_before_captioning(monkeypatch, capsys, under_a_file, tmp_path):
    import pcm.caption

    monkeypatch.setattr(pcm.caption, "caption_images", lambda *a, **k: pytest.fail("captioned despite --out"))
    out = under_a_file / "captions.jsonl"
    code, err = run_pcm(monkeypatch, capsys, "caption", str(tmp_path), "--checkpoint", str(tmp_path),
                        "--out", str(out))
    assert code == 2
    assert_one_clean_line(err, f"--out folder {out.parent}", "choose a writable --out folder")
    code, err = run_pcm(monkeypatch, capsys, "caption", str(tmp_path), "--checkpoint", str(tmp_path),
                        "--out", str(tmp_path))
    assert code == 2
    assert_one_clean_line(err, f"--out {tmp_path} is a folder")


def test_an_os_error_during_a_stage_is_one_line_naming_the_path(monkeypatch, capsys, tmp_path, captions_txt):
    import pcm.stages.ingest

    blocked = tmp_path / "runs" / "ingest" / "abc" / "captions.parquet"

    def fail(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(blocked))

    monkeypatch.setattr(pcm.stages.ingest, "run_ingest", fail)
    code, err = run_pcm(monkeypatch, capsys, "ingest", str(captions_txt), "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"cannot use {blocked}: Permission denied", "writable --root")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(blocked))

    monkeypatch.setattr(pcm.stages.ingest, "run_ingest", full)
    code, err = run_pcm(monkeypatch, capsys, "ingest", str(captions_txt), "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"cannot use {blocked}: No space left on device")


def test_ingest_of_a_too_deeply_nested_json_is_one_line_naming_the_file(monkeypatch, capsys, tmp_path):
    deep = tmp_path / "dataset_deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_pcm(monkeypatch, capsys, "ingest", str(deep), "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"{deep}: JSON nested too deeply")
