"""The import direction of DESIGN.md: storage <- pcm <- flows; only flows/ imports prefect."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def full_imports(source: str, filename: str = "<src>") -> set[str]:
    """Every module a module imports, at any depth (inside functions too); relative imports left out."""
    mods: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def top_level_imports(source: str, filename: str = "<src>") -> set[str]:
    return {m.split(".")[0] for m in full_imports(source, filename)}


def imported_modules(package: str) -> dict[str, set[str]]:
    return {str(path.relative_to(REPO)): top_level_imports(path.read_text(), str(path))
            for path in (REPO / package).rglob("*.py")}


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


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_library_never_imports_stages_or_cli():
    # pcm/*.py is the library (open_clip's split): stages use it, it never reaches up into a stage or the CLI.
    for path in sorted((REPO / "pcm").glob("*.py")):
        up = {m for m in full_imports(path.read_text(), str(path)) if _within(m, "pcm.stages", "pcm.cli")}
        assert not up, f"{path.relative_to(REPO)} imports {up}; library modules stay below pcm/stages and pcm/cli"
    for path in sorted((REPO / "pcm" / "stages").glob("*.py")):
        up = {m for m in full_imports(path.read_text(), str(path)) if _within(m, "pcm.cli")}
        assert not up, f"{path.relative_to(REPO)} imports {up}; stages never import the CLI"


def test_checker_sees_imports():
    # The checker the tests above use must be able to fail: imports at any depth and in either form are found.
    src = "import os\ndef f():\n    import prefect.flows\n    from torch.nn import Linear\n    from . import x\n"
    assert top_level_imports(src) == {"os", "prefect", "torch"}
    assert full_imports(src) == {"os", "prefect.flows", "torch.nn"}


IMPORTS_TORCH = """
import importlib, pkgutil, sys
import {package}
for m in pkgutil.walk_packages({package}.__path__, "{package}."):
    importlib.import_module(m.name)
print(sorted(k for k in ("torch", "webdataset", "diffusers", "open_clip", "transformers") if k in sys.modules))
"""


def _heavy_modules_after_importing(package: str, path: Path = REPO) -> list[str]:
    out = subprocess.run([sys.executable, "-c", IMPORTS_TORCH.format(package=package)], cwd=path, check=True,
                         capture_output=True, text=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_importing_storage_never_imports_torch():
    # Not only no direct import: nothing storage imports may pull torch in (webdataset did, 9.5 s of 10.7 s).
    assert _heavy_modules_after_importing("storage") == []


@pytest.mark.heavy  # its probe is a subprocess that imports torch (and webdataset)
def test_the_import_probe_sees_torch(tmp_path):
    # The probe above must be able to fail: a submodule that imports webdataset (the old storage/shards.py) is caught.
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__init__.py").write_text("")
    (tmp_path / "probe" / "shards.py").write_text("def writer():\n    pass\nimport webdataset\n")
    assert _heavy_modules_after_importing("probe", tmp_path) == ["torch", "webdataset"]
