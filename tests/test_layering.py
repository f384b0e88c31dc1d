"""Layering, read from the source: the method core knows nothing of training frameworks, nothing
imports the CLI, and no new import cycle appears.

Imports are read with ``ast`` (function-local imports included), so a lazy import cannot hide a
dependency from this test.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "distortkd"
# The method: models, losses, distortions and corruptions, diagnostics, the step functions, and the
# plain-file readers. Usable in a notebook or another trainer without Lightning, Hydra or W&B.
CORE = ("vit", "losses", "distortions", "draws", "blur", "mixed", "chains", "corruptions",
        "imagenetc_extra", "cvops", "diagnostics", "steps", "checkpoints", "images", "errors")
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb")
# Cycles that existed before this test and are still to be broken (issue 14); a new one fails.
KNOWN_CYCLES: set[tuple[str, ...]] = set()  # none left: keep it that way


def _imports(module: str) -> set[str]:
    """Top-level package names and ``distortkd.<module>`` names that ``module`` imports."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "distortkd":
                names |= {f"distortkd.{a.name}" for a in node.names}
    return names


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {m: {n.split(".")[1] for n in _imports(m) if n.startswith("distortkd.")} & modules - {m}
            for m in modules}


@pytest.mark.parametrize("module", CORE)
def test_the_method_core_imports_no_training_framework(module):
    found = sorted(n for n in _imports(module) if n.split(".")[0] in FRAMEWORKS)
    assert not found, f"{module} imports {found}"
    inner = {n.split(".")[1] for n in _imports(module) if n.startswith("distortkd.")}
    assert inner <= set(CORE), f"{module} imports {sorted(inner - set(CORE))} from outside the core"


def test_nothing_imports_the_cli():
    users = sorted(m for m, deps in _graph().items() if "cli" in deps)
    assert not users, f"{users} import distortkd.cli: the CLI wires the package, never the reverse"


def test_no_new_import_cycle():
    graph, cycles = _graph(), set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for dep in graph[node]:
            if dep == start:
                cycles.add(tuple(sorted(path)))
            elif dep not in path and len(path) < 8:
                walk(start, dep, [*path, dep])

    for module in graph:
        walk(module, module, [module])
    assert cycles <= KNOWN_CYCLES, f"new import cycles: {sorted(cycles - KNOWN_CYCLES)}"


def test_uint8_canvases_become_images_only_inside_the_datamodule():
    """Batches are ``[0, 1]`` images outside ``data``: loops read ``device_batches``; only the
    data-path benchmarks call the crop itself (they time it)."""
    timing = {"data", "bench_data", "bench_gpu"}
    callers = sorted(p.stem for p in PACKAGE.glob("*.py")
                     if p.stem not in timing and ".to_images(" in p.read_text())
    assert not callers, f"{callers} convert uint8 canvases by hand; use ImageDataModule.device_batches"
