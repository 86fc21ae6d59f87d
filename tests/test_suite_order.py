"""The suite's own scheduling: the files tests/conftest.py hands out first exist (a renamed file would
silently lose its place and could start last, keeping one worker busy after the others are done)."""

from __future__ import annotations

from pathlib import Path

from conftest import LONGEST


def test_the_files_handed_out_first_exist_once_each():
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    assert sorted(set(LONGEST) - files) == []
    assert len(set(LONGEST)) == len(LONGEST)
