"""Imports point one way (docs/design.md): every import in the package, read with `ast`, goes from a layer to
the same layer or one below it, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import imagegpt

PACKAGE = Path(imagegpt.__file__).parent

# Bottom to top. A module may import its own layer and those below it. A module is placed by its first name
# under imagegpt ("data" for imagegpt.data.cache); "" is the package itself (imagegpt/__init__.py).
LAYERS = [
    ("leaves", {"errors", "config", "device", "files", "limits", "hub"}),
    ("images and data", {"pixels", "palette", "processor", "grid", "data"}),
    ("transformers-format I/O", {"pretrained"}),  # from_pretrained / save_pretrained: cls(config), no model
    ("model", {"model", "objectives"}),
    ("checkpoints and run directories", {"checkpoint"}),
    # kernels: the deprecated name of cpu (the native decode engine, which only sampling drives)
    ("inference", {"sampling", "quantize", "cpu", "kernels", "evaluate", "probe"}),
    ("training", {"trainer", "loop", "train", "finetune", "study"}),
    ("programs", {"", "__main__", "cli", "commands", "demo", "app"}),
]

# Arrows known to point up, each to be removed by the change named beside it.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at the top or inside a function), for every module of
    the package in `root`. `from X import name` is an import of X.name where that is a module, else of X."""
    modules = {module_name(p, root): p for p in root.rglob("*.py")}
    for source in root.rglob("*.c"):  # a compiled extension (imagegpt._kernels), built or not
        modules[f"{module_name(source.with_name('__init__.py'), root)}.{source.stem}"] = source
    top = root.name
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        if path.suffix != ".py":
            continue
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found |= {t for t in targets if t == top or t.startswith(top + ".")}
        found.discard(name)
    return edges


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for index, (_, names) in enumerate(LAYERS):
        if first in names:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: place it there and in design.md")


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in edges.items()
        for b in targets
        if layer_of(b) > layer_of(a) and (a, b) not in KNOWN_UPWARD
    )


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a, b, ..., a), or None; the known upward arrows left out."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if (module, target) in KNOWN_UPWARD:
                continue
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_every_import_points_down_the_layers_and_none_goes_round():
    edges = package_imports(PACKAGE)
    assert "imagegpt.loop" in edges["imagegpt.train"]  # the reader sees the package's imports
    assert upward(edges) == []
    assert cycle(edges) is None
    still = {(a, b) for a, b in KNOWN_UPWARD if b in edges.get(a, ())}
    assert still == KNOWN_UPWARD, f"{KNOWN_UPWARD - still} no longer point up: remove them from KNOWN_UPWARD"


def test_readers_of_runs_never_import_the_training_code():
    edges = package_imports(PACKAGE)
    for reader in ("imagegpt.sampling", "imagegpt.evaluate", "imagegpt.probe", "imagegpt.checkpoint"):
        assert not edges[reader] & {"imagegpt.trainer", "imagegpt.train", "imagegpt.loop"}, reader


def test_only_sampling_drives_the_cpu_engine():
    """The native kernels are imagegpt.cpu's alone: one call site (sampling.make_decoder) builds its engine,
    and nothing else in the package imports it (but the deprecated alias, imagegpt.kernels)."""
    edges = package_imports(PACKAGE)
    users = {
        m for m, targets in edges.items() if any(t.split(".")[:2] == ["imagegpt", "cpu"] for t in targets)
    }
    assert {m for m in users if not m.startswith("imagegpt.cpu")} == {"imagegpt.sampling", "imagegpt.kernels"}
    assert not any(t.startswith("imagegpt.cpu") for t in edges["imagegpt.model"])


def test_commands_share_helpers_through_options_only():
    edges = package_imports(PACKAGE)
    for module, targets in edges.items():
        if module.startswith("imagegpt.commands."):
            siblings = {t for t in targets if t.startswith("imagegpt.commands.")}
            assert siblings <= {"imagegpt.commands._options"}, module


@pytest.fixture
def fake_package(tmp_path):
    """A package whose `errors` (a leaf) imports `train` (training) inside a function, and `train` imports it
    back: an upward arrow and a circle, which the checks must both report."""
    root = tmp_path / "imagegpt"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("def f():\n    from .train import g\n")
    (root / "train.py").write_text("from . import errors\nfrom .errors import f\n\ndef g():\n    pass\n")
    return root


def test_the_checks_catch_an_upward_arrow_and_a_circle(fake_package):
    edges = package_imports(fake_package)
    assert edges["imagegpt.errors"] == {"imagegpt.train"}
    assert edges["imagegpt.train"] == {"imagegpt.errors"}
    assert upward(edges) == ["imagegpt.errors (leaves) imports imagegpt.train (training)"]
    assert cycle(edges) == ["imagegpt.errors", "imagegpt.train", "imagegpt.errors"]
