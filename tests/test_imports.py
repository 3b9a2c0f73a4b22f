"""The package's structure: every module imports on its own, the import graph (function-
local imports included) has no cycle and no arrow from a lower room to a higher one, and
only the pipeline and the public loaders read an artifact's manifest."""

from __future__ import annotations

import ast
import graphlib
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crv"

MANIFEST_READERS = {"crv/pipeline.py"}
"""Modules that may name the pipeline's `manifest.json`; stages go through
`crv.pipeline.read_manifest` / `artifact_config` and the stages' loaders."""

ROOMS: tuple[tuple[str, ...], ...] = (
    ("crv", "errors"),
    ("io", "options", "tokens", "tables", "generation"),
    ("device", "runtime"),
    ("executor", "pipeline"),
    ("tasks",),
    ("models",),
    ("subject",),
    ("traces",),
    ("transcoders",),
    ("cards", "graphs"),
    ("features", "baselines"),
    ("verifier", "mechanisms"),
    ("interventions",),
    ("shipped",),
    ("bundle",),
    ("check",),
    ("report", "config"),
    ("cli",),
)
"""The rooms of crv/ from the floor up, read off the stage DAG: a module may import its own
room and the rooms of lower tiers, never a room of its own tier or above. A room is a
package (`crv/traces/`) or a top-level module (`crv/io.py`). tasks sits below models
(crv-tiny trains on the tasks); config assembles every stage's section; cli is the roof.
`crv` is the package itself (its version)."""

IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "crv" or m.startswith("crv.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the crv modules it imports anywhere in its file (top level, inside
    functions, under TYPE_CHECKING), relative imports resolved."""
    names = set(module_names())
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in names and t != name}
    return graph


def room_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_import_graph_has_no_cycle_and_no_upward_arrow():
    graph = import_graph()
    assert "crv.transcoders.distributed" in graph["crv.cli.torchrun"]  # function-local ones too
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
    tier = {room: i for i, rooms in enumerate(ROOMS) for room in rooms}
    rooms = {room_of(m) for m in graph}
    assert rooms == set(tier), f"rooms not placed in ROOMS: {rooms ^ set(tier)}"
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if room_of(t) != room_of(m) and tier[room_of(t)] >= tier[room_of(m)]
    )
    assert not upward, "imports from a room to one of its own tier or above:\n" + "\n".join(upward)


def test_only_the_stage_table_imports_stage_modules():
    """A stage's `stage.py` holds `run_stage` and what only it uses: other rooms (crv-verify's
    engine, the bundle, interventions, ...) read that stage's library modules instead. The
    pipeline names each runner as a "module:function" string, imported when it runs."""
    from crv.pipeline import STAGES

    runners = {stage.runner.split(":")[0] for stage in STAGES}
    stage_modules = {m for m in import_graph() if m.endswith(".stage")}
    assert stage_modules <= runners, stage_modules - runners
    found = {
        (m, t)
        for m, targets in import_graph().items()
        for t in targets
        if t in stage_modules and m != "crv.pipeline"
    }
    assert not found, sorted(found)


def test_every_module_imports_on_its_own():
    """Each module first, in a fresh set of crv modules (third-party ones stay loaded, so
    the loop is fast): a cycle shows as an ImportError of a partly initialised module."""
    names = module_names()
    assert "crv.cli.verify" in names and "crv.pipeline" in names
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_only_the_pipeline_reads_manifests():
    readers = {
        str(path.relative_to(ROOT))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"manifest\.json|\bMANIFEST\b(?!_)", path.read_text())
    }
    assert readers <= MANIFEST_READERS, readers - MANIFEST_READERS


def test_docs_tree_and_stage_table_match_the_code():
    """docs/architecture.md names every package and module of crv/, and its stage table
    has one row per pipeline stage pointing at that stage's runner."""
    from crv.pipeline import STAGES

    doc = (ROOT / "docs" / "architecture.md").read_text()
    tree = doc.split("## The tree", 1)[1].split("\n## ", 1)[0]
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            assert path.name in tree, f"{path.relative_to(ROOT)} is not in the docs tree"
        if path.parent != PACKAGE:
            assert f"{path.parent.name}/" in tree, f"{path.parent.name}/ is not in the docs tree"
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    for stage in STAGES:
        [row] = [r for r in rows if r.startswith(f"| `{stage.name}` |") and "run_stage" in r]
        module, func = stage.runner.split(":")
        parts = module.split(".")
        package = "/".join(parts[:-1]) if len(parts) > 2 else module.replace(".", "/") + ".py"
        assert f"`{package}" in row, (stage.name, package)
        assert (f"{parts[-1]}.{func}" if len(parts) > 2 else func) in row, (stage.name, row)
    assert len([r for r in rows if "run_stage" in r]) == len(STAGES)


def test_every_error_class_is_a_crv_error():
    """Each exception class crv defines subclasses `crv.errors.CRVError`, so that a command
    prints any of them as one line."""
    import importlib

    from crv.errors import CRVError

    defined = []
    for name in module_names():
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.bases]
        module = importlib.import_module(name) if classes else None
        for cls in classes:
            obj = getattr(module, cls)
            if isinstance(obj, type) and issubclass(obj, BaseException):
                defined.append(obj)
    assert len(defined) >= 8, defined
    assert not [c for c in defined if not issubclass(c, CRVError)]
