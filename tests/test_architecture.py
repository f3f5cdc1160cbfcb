"""The package's layers (docs/architecture.md), read from the source: each module imports only from its own
layer or the layers below, with no circle and no other module's private name, and kd students are built in
one place (kd/wiring.py)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distill_cli"
# bottom to top
LAYERS = ["core", "data", "models", "losses", "training", "kd", "ship", "runs", "sweeps", "cli"]
# what a layer may not import although it sits above: the loop knows no KD method
FORBIDDEN = {"training": {"losses", "kd"}, "ship": {"losses", "kd"}}
# imports inside functions, and why they may stay there: the CLI keeps `distill --help` fast; drawing
# needs matplotlib only when plots are written; a registry imports its members on first use
DEFERRED = {"cli.main", "cli.torchrun", "sweeps.report", "data", "models"}


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return modules


MODULES = _modules()


def _imports(name: str, tree: ast.Module):
    """(imported module, imported name, line, inside a function) of each import of a project module."""
    is_package = (PACKAGE / Path(*name.split(".")) / "__init__.py").is_file()
    nested = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(function)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = name.split(".") if is_package else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *([node.module] if node.module else [])])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distill_cli"):
            target = node.module.removeprefix("distill_cli").lstrip(".")
        else:
            continue
        for alias in node.names:
            full = f"{target}.{alias.name}".lstrip(".")
            module = full if full in MODULES else target
            yield module, alias.name, node.lineno, id(node) in nested


def _layer(module: str) -> str:
    first = module.split(".")[0]
    return first if first in LAYERS else "cli"  # distill_cli itself and __main__


def test_every_module_sits_in_a_layer():
    assert {_layer(name) for name in MODULES} == set(LAYERS)
    assert all(name.split(".")[0] in LAYERS for name in MODULES if name not in ("", "__main__"))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_layer_and_those_below(name):
    own = _layer(name)
    for module, imported, line, deferred in _imports(name, MODULES[name]):
        layer = _layer(module)
        assert LAYERS.index(layer) <= LAYERS.index(own), f"{name}:{line} imports {module} from the layer above ({layer})"
        assert layer not in FORBIDDEN.get(own, ()), f"{name}:{line} imports {module}: {own} may not use {layer}"
        assert not imported.startswith("_") or module == name, f"{name}:{line} takes {module}'s private {imported}"
        if deferred:
            assert name in DEFERRED, f"{name}:{line} imports {module} inside a function"


def test_no_import_circle():
    graph = {name: {module for module, _, _, _ in _imports(name, tree) if module != name} for name, tree in MODULES.items()}
    for name in graph:  # a package importing its registry's members is fine, its members importing the registry too
        graph[name] = {module for module in graph[name] if not module.startswith(name + ".")}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for module in graph.get(name, ()):
            assert state.get(module) != "open", f"import circle: {' -> '.join([*path, name, module])}"
            if module not in state:
                visit(module, [*path, name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_students_are_built_only_by_the_kd_wiring():
    """`build_student` (kd/wiring.py, which `wire_kd` and `check_kd` use) makes every student; nothing else calls
    build_model on a student's or a peer's config."""
    builders = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "build_model" and node.args:
                if any(word in ast.unparse(node.args[0]) for word in ("student", "peer")):
                    builders.append(f"{name}:{node.lineno}")
    assert builders == []
    (build_student,) = [node for node in ast.walk(MODULES["kd.wiring"]) if getattr(node, "name", None) == "build_student"]
    assert "build_model(" in ast.unparse(build_student)
