"""The import direction of DESIGN.md: storage <- pcm <- flows; only flows/ imports prefect."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        mods: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = mods
    return found


def test_pcm_and_storage_never_import_prefect():
    for package in ("pcm", "storage"):
        for path, mods in imported_modules(package).items():
            assert "prefect" not in mods, f"{path} imports prefect; only flows/ may"


def test_storage_imports_no_model_library_and_nothing_above_it():
    for path, mods in imported_modules("storage").items():
        bad = mods & {"diffusers", "open_clip", "transformers", "torch", "pcm", "flows", "prefect"}
        assert not bad, f"{path} imports {bad}; storage/ holds formats and places only"


def test_pcm_never_imports_flows():
    for path, mods in imported_modules("pcm").items():
        assert "flows" not in mods, f"{path} imports flows/"


def test_checker_sees_imports(tmp_path):
    # The checker itself must be able to fail: an import inside a function is found.
    src = "def f():\n    import prefect\n"
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    assert "prefect" in mods
