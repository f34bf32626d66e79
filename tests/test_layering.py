"""Import direction: entry points on top, engines below them, tracking a sink that imports no engine.

Every import counts, including those inside functions (the lazy ones), read from the source with ``ast``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "orchard"

TOP = ("orchard.cli", "orchard.runner", "orchard.study", "orchard.job_entry", "orchard.tune")  # entry points: nothing below imports them
ENGINES = ("orchard.train", "orchard.federated", "orchard.remote", "orchard.bench", "orchard.explain")
RULES = {
    "tracking": ("orchard.federated", "orchard.train", "orchard.engine", "orchard.data", "orchard.explain", *TOP),
    # explain reads the prepared data and the run (data.manifest, tracking), never an engine
    "explain": ("orchard.train", "orchard.federated", "orchard.remote", "orchard.bench", "orchard.engine", *TOP),
    # deploy (registry, serving, export) works on a logged model: no engine, no data preparation
    "deploy": ("orchard.train", "orchard.federated", "orchard.remote", "orchard.bench", "orchard.explain",
               "orchard.data.pipeline", *TOP),
    "federated": ("orchard.tracking", "orchard.train", "orchard.remote", "orchard.bench", *TOP),
    "train": ("orchard.tracking", "orchard.federated", "orchard.remote", "orchard.bench", *TOP),
    "remote": ("orchard.tracking", *ENGINES[:2], "orchard.data", *TOP),
    "engine": ("orchard.tracking", "orchard.data", "orchard.models", *ENGINES, *TOP),
    "models": ("orchard.tracking", "orchard.data", "orchard.engine", *ENGINES, *TOP),
    "data": ("orchard.tracking", "orchard.engine", "orchard.models", *ENGINES, *TOP),
}
# Modules inside a layer that are entry points of their own, and what they may import beyond its rule:
# ``flwr run`` loads the ServerApp from federated/app.py the way ``orchard run`` enters through runner.py,
# so it owns the MLflow run of a deployed federation.
ENTRY_FILES = {"orchard/federated/app.py": ("orchard.tracking",)}


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def violations(subpackage: str, banned: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        allowed = ENTRY_FILES.get(path.relative_to(PACKAGE.parent).as_posix(), ())
        for name in sorted(imports_of(path)):
            if any(name == a or name.startswith(a + ".") for a in allowed):
                continue
            if any(name == b or name.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


@pytest.mark.parametrize("subpackage", sorted(RULES))
def test_layers_import_only_downwards(subpackage):
    assert (PACKAGE / subpackage).is_dir()
    assert violations(subpackage, RULES[subpackage]) == []


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "orchard"
    (fake / "tracking").mkdir(parents=True)
    (fake / "tracking" / "x.py").write_text("def f():\n    from orchard.federated.partitions import y\n"
                                            "    from ..train import launcher\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("tracking", RULES["tracking"]) == [
        "orchard/tracking/x.py imports orchard.federated.partitions",
        "orchard/tracking/x.py imports orchard.federated.partitions.y",
        "orchard/tracking/x.py imports orchard.train",
        "orchard/tracking/x.py imports orchard.train.launcher",
    ]


def test_the_shared_low_layers_import_no_engine_or_tracking_library():
    code = ("import sys, orchard.results, orchard.progress, orchard.raystart, orchard.tracking\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'flwr', 'pyspark', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": ""})
    assert out.stdout.strip() == "[]"
