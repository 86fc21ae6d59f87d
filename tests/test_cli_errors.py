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


@pytest.mark.bad_input
def test_run_with_a_root_below_a_file_is_one_line_naming_it(monkeypatch, capsys, under_a_file):
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(under_a_file))
    assert code == 2
    assert_one_clean_line(err, f"--root {under_a_file}", f"{under_a_file.parent} is a file, not a folder",
                          "choose a writable --root")
    res = CliRunner().invoke(app, ["run", "ingest", "--root", str(under_a_file)])
    assert res.exit_code != 0 and isinstance(res.exception, ValueError)
    assert str(under_a_file) in str(res.exception)


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_a_root_access_denies_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    import pcm.stages.pipeline

    root = tmp_path / "runs"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == root else real_access(p, mode, **kw))
    monkeypatch.setattr(pcm.stages.pipeline, "run_pipeline", lambda *a, **k: pytest.fail("ran despite the root"))
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(root))
    assert code == 2
    assert_one_clean_line(err, f"cannot write to --root {root}: permission denied", "choose a writable --root")


@pytest.mark.bad_input
def test_a_root_where_no_file_can_be_made_is_refused(monkeypatch, capsys, tmp_path):
    """os.access can say yes where writes fail (a read-only mount, ACLs): a probe file must be made."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(kwargs.get("dir")))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = run_pcm(monkeypatch, capsys, "run", "ingest", "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"cannot write to --root {tmp_path / 'runs'}: Read-only file system")


@pytest.mark.bad_input
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


@pytest.mark.bad_input
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


@pytest.mark.bad_input
def test_ingest_of_a_too_deeply_nested_json_is_one_line_naming_the_file(monkeypatch, capsys, tmp_path):
    deep = tmp_path / "dataset_deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_pcm(monkeypatch, capsys, "ingest", str(deep), "--root", str(tmp_path / "runs"))
    assert code == 2
    assert_one_clean_line(err, f"{deep}: JSON nested too deeply")


# -------------------------------------------------- --set: one grammar, one-line errors naming the key
EVAL_INPUTS = ["--train", "t", "--encode", "e", "--captions", "c"]
BAD_SETS = [
    (["synthesize", "--captions", "c", "--set", "stepz=4"],
     ["--set stepz=4: unknown key 'stepz' (did you mean 'steps'?)", "valid keys: model, revision, dtype"]),
    (["synthesize", "--captions", "c", "--dry-run", "--set", "steps=abc"], ["--set steps=abc", "valid integer"]),
    (["synthesize", "--captions", "c", "--set", "steps.x=1"], ["'steps' is not a table"]),
    (["encode", "--captions", "c", "--shards", "s", "--set", "clip.pol=4"],
     ["--set clip.pol=4: unknown key 'clip.pol'", "valid keys of clip: clip.model, clip.pretrained"]),
    (["encode", "--captions", "c", "--shards", "s", "--set", "clip={pol = 4}"], ["unknown key 'clip.pol'"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "model.d_modl=3"],
     ["--set model.d_modl=3", "unknown model fields ['d_modl']", "'d_model'"]),
    (["train", "--captions", "c", "--encode", "e", "--set", "batch_size=0"], ["--set batch_size=0", "greater than 0"]),
    (["evaluate", *EVAL_INPUTS, "--set", "split=train"], ["--set split=train", "'test' or 'val'"]),
    (["ingest", "caps.txt", "--set", "splits=[val, test]"], ["--set splits=[val, test]", "quote the strings inside"]),
    (["ingest", "caps.txt", "--set", "source=other.txt"], ["source is given by SOURCE or --demo"]),
    (["ingest", "caps.txt", "--set", "max_chars"], ["--set 'max_chars': expected KEY=VALUE"]),
    (["run", "--set", "train.lrr=1"], ["--set train.lrr=1: unknown key 'train.lrr'", "train.lr_factor"]),
    (["run", "--set", "trian.epochs=1"], ["unknown section 'trian' (did you mean 'train'?)", "ingest, synthesize"]),
    (["run", "--show-config", "--set", "train.epochs=abc"], ["--set train.epochs=abc", "valid integer"]),
    (["run", "--show-config", "--set", "encode.clip.pool=0"], ["--set encode.clip.pool=0", "grid side >= 1"]),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, parts", BAD_SETS, ids=[" ".join(a[:1] + a[-1:]) for a, _ in BAD_SETS])
def test_a_bad_set_key_or_value_is_one_line_naming_it(monkeypatch, capsys, tmp_path, args, parts):
    monkeypatch.chdir(tmp_path)
    code, err = run_pcm(monkeypatch, capsys, *args, *([] if args[0] == "run" else ["--root", str(tmp_path)]))
    assert code == 2
    assert_one_clean_line(err, *parts)


REMOVED = [
    (["synthesize", "--captions", "c", "--steps", "4"], "use --set steps=4 "),
    (["synthesize", "--captions", "c", "--no-progress", "--height=64"], "use --set progress_bar=false --set height=64"),
    (["synthesize", "--captions", "c", "--negative-prompt", "a dog"], "use --set 'negative_prompt=a dog'"),
    (["ingest", "caps.txt", "--no-dedup", "--max-chars", "80"], "use --set dedup=false --set max_chars=80"),
    (["encode", "--captions", "c", "--shards", "s", "--clip", "tiny", "--pretrained", "none"],
     "use --set clip.model=tiny --set clip.pretrained=none"),
    (["train", "--captions", "c", "--encode", "e", "--devices", "2"], "use --set devices=2"),
    (["evaluate", *EVAL_INPUTS, "--beam-size", "5"], "use --set beam_size=5"),
    (["run", "--steps", "4"], "use --set synthesize.steps=4"),
    (["run", "--device", "cpu"], "use one of --set synthesize.device=cpu, --set encode.device=cpu"),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("args, hint", REMOVED, ids=[" ".join(a) for a, _ in REMOVED])
def test_a_removed_option_says_which_set_to_use(monkeypatch, capsys, args, hint):
    code, err = run_pcm(monkeypatch, capsys, *args)
    assert code == 2
    assert_one_clean_line(err, f"`pcm {args[0]}` has no option --", hint, f"(`pcm {args[0]} --help` lists every key)")
    res = CliRunner().invoke(app, args)  # the same through the typer app alone
    assert isinstance(res.exception, ValueError) and hint in str(res.exception)


def test_an_option_that_is_no_config_field_keeps_clicks_error(monkeypatch, capsys):
    code, err = run_pcm(monkeypatch, capsys, "synthesize", "--captions", "c", "--bogus")
    assert code == 2 and "No such option: --bogus" in err
