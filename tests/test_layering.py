"""The import structure: config -> data -> model -> loss -> checkpoint reads top-down. Every import of every
module is read from its source (those inside functions too; ``if TYPE_CHECKING:`` blocks are not imports at
run time), so a lazy import cannot hide an arrow that runs back up."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mmstory"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The mmstory modules ``path`` imports at run time (``from mmstory.x import y``: mmstory.x, or mmstory.x.y
    when that is a module)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for child in node.body for n in ast.walk(child)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mmstory")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmstory"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_itself_back():
    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in GRAPH for b in GRAPH[a]
                    if a in _reach(b) and not a.startswith(b + ".") and b != "mmstory")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module, never", [
    ("mmstory.prompts", ("mmstory.",)),                       # the bottom: imports nothing of mmstory
    ("mmstory.config", ("mmstory.data", "mmstory.model", "mmstory.inference", "mmstory.evaluate", "mmstory.train")),
    ("mmstory.data.loader", ("mmstory.model", "mmstory.inference", "mmstory.evaluate", "mmstory.train")),
    ("mmstory.model", ("mmstory.data", "mmstory.inference", "mmstory.evaluate", "mmstory.train", "mmstory.compress_cli")),
    ("mmstory.losses", ("mmstory.data", "mmstory.model", "mmstory.inference", "mmstory.train")),
    ("mmstory.inference", ("mmstory.evaluate", "mmstory.train", "mmstory.data.loader")),
    ("mmstory.evaluate", ("mmstory.train",)),
])
def test_lower_layers_never_reach_higher_ones(module, never):
    reached = sorted(m for m in _reach(module) if m.startswith(never))
    assert not reached, f"{module} reaches {reached}"


def test_importing_the_model_loads_no_data_pipeline():
    code = ("import sys, mmstory.model; print(' '.join(m for m in sys.modules if m.startswith("
            "('mmstory.data', 'mmstory.inference', 'mmstory.evaluate', 'mmstory.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    # `import mmstory.model` runs mmstory/__init__.py first, which exports the inference functions; the model
    # module itself must not need them: check it from a fresh interpreter without the package face
    code2 = ("import sys, importlib.util, types; pkg = types.ModuleType('mmstory'); "
             f"pkg.__path__ = [{str(PACKAGE)!r}]; sys.modules['mmstory'] = pkg; import mmstory.model; "
             "print(' '.join(m for m in sys.modules if m.startswith(('mmstory.data', 'mmstory.inference', "
             "'mmstory.evaluate', 'mmstory.train'))))")
    bare = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=True).stdout.strip()
    assert bare == "", f"import mmstory.model loads {bare}"
    assert "mmstory.train" not in out
