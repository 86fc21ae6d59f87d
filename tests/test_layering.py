"""The import direction of DESIGN.md (storage <- pcm <- flows; only flows/ imports prefect), the layers inside
pcm/ (library <- stages <- cli), checked in every package at any depth, and no import cycle among the project's
modules. docs/architecture.md draws the same map."""

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


# Modules of pcm/ outside pcm/stages and pcm/cli that drive whole pipelines: they sit on the stages' level (they
# may import pcm.stages, never the CLI) and no library module may import them.
DRIVERS = {"pcm/toyworld/ablation.py"}


def library_files() -> list[Path]:
    """Every module of the pcm library, at any depth (pcm/toyworld/ included): pcm/ less stages/, cli/, DRIVERS."""
    below = (REPO / "pcm" / "stages", REPO / "pcm" / "cli")
    return sorted(p for p in (REPO / "pcm").rglob("*.py")
                  if not any(p.is_relative_to(b) for b in below) and str(p.relative_to(REPO)) not in DRIVERS)


def test_library_never_imports_stages_cli_or_drivers():
    # pcm/**/*.py is the library (open_clip's split): stages use it, it never reaches up into a stage or the CLI.
    drivers = {m.removesuffix(".py").replace("/", ".") for m in DRIVERS}
    files = library_files()
    assert REPO / "pcm" / "toyworld" / "world.py" in files and REPO / "pcm" / "clip.py" in files  # it recurses
    for path in files:
        up = {m for m in full_imports(path.read_text(), str(path)) if _within(m, "pcm.stages", "pcm.cli", *drivers)}
        assert not up, f"{path.relative_to(REPO)} imports {up}; library modules stay below pcm/stages and pcm/cli"


def test_stages_and_drivers_never_import_the_cli():
    paths = sorted((REPO / "pcm" / "stages").rglob("*.py")) + [REPO / d for d in sorted(DRIVERS)]
    for path in paths:
        up = {m for m in full_imports(path.read_text(), str(path)) if _within(m, "pcm.cli")}
        assert not up, f"{path.relative_to(REPO)} imports {up}; stages never import the CLI"


def test_flows_never_import_the_cli():
    # flows/ and pcm/cli/ are peers (docs/architecture.md): both call the stages, neither imports the other.
    for path, mods in ((p, full_imports(p.read_text(), str(p))) for p in sorted((REPO / "flows").rglob("*.py"))):
        assert not {m for m in mods if _within(m, "pcm.cli")}, f"{path.relative_to(REPO)} imports pcm.cli"


def test_the_architecture_map_places_every_module():
    # docs/architecture.md gives every module of the three packages a line; a new module must be placed there.
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = sorted(str(p.relative_to(REPO)) for pkg in ("storage", "pcm", "flows") for p in (REPO / pkg).rglob("*.py"))
    assert len(modules) > 80
    missing = [m for m in modules if f"| `{m}` |" not in text]
    assert not missing, f"docs/architecture.md does not place {missing}"
    assert all(f"`{d}` | **driver**" in text for d in DRIVERS)


def test_checker_sees_imports():
    # The checker the tests above use must be able to fail: imports at any depth and in either form are found.
    src = "import os\ndef f():\n    import prefect.flows\n    from torch.nn import Linear\n    from . import x\n"
    assert top_level_imports(src) == {"os", "prefect", "torch"}
    assert full_imports(src) == {"os", "prefect.flows", "torch.nn"}


def test_no_test_module_imports_another():
    # Shared stage inputs live in tests/builders.py (and the pcm-parses check in tests/cli_parse.py): importing a
    # test module runs its module code again under another name and ties one test file's fixtures to another's.
    for path in sorted((REPO / "tests").rglob("*.py")):
        tests = {m for m in full_imports(path.read_text(), str(path)) if m.split(".")[-1].startswith("test_")}
        assert not tests, f"{path.relative_to(REPO)} imports the test module(s) {tests}; use tests/builders.py"


# ---------------------------------------------------------------------- import cycles
PACKAGES = ("storage", "pcm", "flows")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_time_imports(source: str, filename: str = "<src>") -> set[str]:
    """The modules a module imports while it is being imported: its body, class bodies and try/if blocks, but not
    function bodies (they run later) nor `if TYPE_CHECKING:` blocks (they never run). `from a import b` counts as
    importing `a` and, where b is a module, `a.b`; callers keep the names that are modules."""
    mods: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
                mods.update(f"{node.module}.{a.name}" for a in node.names)
            for block in (getattr(node, f, None) for f in ("body", "orelse", "finalbody", "handlers")):
                if isinstance(block, list):
                    visit(block)

    visit(ast.parse(source, filename=filename).body)
    return mods


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules that importing it runs: those it names, and their parent packages (importing
    a.b.c runs a/__init__.py and a/b/__init__.py first) unless they are its own (already running by then)."""
    paths = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        named = import_time_imports(path.read_text(), str(path))
        parents = {".".join(m.split(".")[:i]) for m in named for i in range(1, m.count(".") + 1)}
        parents = {p for p in parents if not name.startswith(p + ".")}
        graph[name] = {t for t in named | parents if t in paths and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def test_no_package_has_an_import_cycle():
    """No cycle among the project's modules through the imports that run when a module is imported.

    Imports inside functions are left out on purpose: they run when the function is called, after every module
    involved has finished importing, so they cannot leave a module half-initialised. One known circle exists only
    through such imports: pcm/__init__.py imports pcm.caption lazily for `pcm.Captioner` while pcm.caption's
    dependencies import siblings as `from pcm import bundled`. storage/ has none at all (the next test)."""
    graph = import_graph(REPO, PACKAGES)
    assert {"storage.layout", "pcm.stages.train", "pcm.toyworld.world", "flows.train"} <= set(graph)  # recursive
    assert "storage.atomic" in graph["storage.layout"]  # and it sees the edges
    assert cycles(graph) == []


def test_storage_has_no_import_cycle_even_through_imports_inside_functions():
    """storage/ is one direction throughout: transport (remote) <- layout, lease <- publish, locks (the lock factory);
    no module reaches up into another from inside a function."""
    names = {module_name(p, REPO) for p in (REPO / "storage").rglob("*.py")}
    graph = {}
    for path in (REPO / "storage").rglob("*.py"):
        named = {f"{n.module}.{a.name}" for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 for a in n.names}
        named |= full_imports(path.read_text(), str(path))      # inside functions too
        graph[module_name(path, REPO)] = {m for m in named if m in names and m != module_name(path, REPO)}
    assert {"storage.remote", "storage.lease", "storage.layout"} <= graph["storage.publish"]  # it sees the edges
    assert cycles(graph) == []


def test_the_cycle_checker_finds_a_cycle_and_ignores_function_imports(tmp_path):
    # The test above must be able to fail: a module-level cycle through a package's __init__ is found, a circle
    # closed only inside a function or under TYPE_CHECKING is not.
    pkg = tmp_path / "app"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from app.sub import c\n")
    (pkg / "a.py").write_text("from app import b\n")
    (pkg / "b.py").write_text("import os\ntry:\n    import app.sub.c\nexcept ImportError:\n    pass\n")
    (pkg / "sub" / "c.py").write_text("from app.a import x\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nimport app.e\nif TYPE_CHECKING:\n    import app.f\n")
    (pkg / "e.py").write_text("def later():\n    import app.d\n")
    (pkg / "f.py").write_text("import app.d\n")
    graph = import_graph(tmp_path, ("app",))
    assert cycles(graph) == [["app.a", "app.b", "app.sub", "app.sub.c"]]


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


def test_the_pipeline_finds_the_bundled_data_without_importing_the_toy_world():
    """The data folders are named in pcm/bundled.py: resolving the demo preset ({toymodels}, {toyworld}) and
    reading the shipped models' identity import no part of the toy world's builders."""
    probe = ("import sys\nfrom pcm.stages.pipeline import resolve\nfrom pcm.identity import shipped_clip_dirs\n"
             "resolve('demo'); shipped_clip_dirs()\n"
             "print(sorted(m for m in sys.modules if m.startswith('pcm.toyworld')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
