"""The package's import structure: no cycle, no module importing one above it, a light `import vlp`."""

import ast
import subprocess
import sys
from pathlib import Path

import vlp

SRC = Path(vlp.__file__).parent
# Lower layers first; a module may import its own layer and those before it, never one after.
LAYERS = [
    ("vlp.errors", "vlp.outputs"),
    ("vlp.config", "vlp.distributed", "vlp.precision", "vlp.geometry", "vlp.flags"),
    ("vlp.assets",),
    ("vlp.layers", "vlp.data", "vlp.losses", "vlp.likelihood", "vlp.generation", "vlp.abilities", "vlp.model_size"),
    ("vlp.towers", "vlp.shapes"),
    ("vlp.models",),
    ("vlp.registry",),
    ("vlp.checkpoint",),
    ("vlp.convert", "vlp.evals", "vlp.objectives"),
    ("vlp.tasks",),
    ("vlp.train", "vlp.index"),
    ("vlp.capfilt", "vlp.demo", "vlp.report", "vlp.serve"),
    ("vlp.cli", "vlp.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """Every vlp module `name` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}  # fmt: skip
    return {module for module in found if module in MODULES and module not in (name, "vlp")}


def _layer(name: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_imports.py")


def test_no_module_imports_one_above_it():
    upward = [f"{name} -> {imported}" for name in MODULES if name != "vlp" for imported in _imports(name)
              if _layer(imported) > _layer(name)]  # fmt: skip
    assert not upward, upward


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES if name != "vlp"}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for child in sorted(graph.get(name, ())):
            if state.get(child) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(child):], child]))
            if child not in state:
                visit(child, [*path, child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_import_vlp_and_loading_import_no_training_code():
    """`import vlp` imports no torch at all; what loading and predicting import (the converters, the checkpoint,
    the model families, the task table) imports no objective, trainer, process-group code or webdataset."""
    code = ("import sys, vlp; light = set(sys.modules); import vlp.convert, vlp.tasks; "
            "print('torch' in light); print(' '.join(sorted(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False"
    loaded = out[1].split()
    heavy = [m for m in loaded if m.startswith(("vlp.objectives", "vlp.train", "vlp.distributed", "webdataset"))]
    assert not heavy, heavy
