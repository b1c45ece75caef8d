"""The package reads bottom up, and stays that way.

The layer contract is pyproject's ``[tool.importlinter]`` (``lint-imports`` runs it in CI); these tests
read the same contract and check it, and what import-linter does not say, from the source itself
(every import counted: module level, inside functions, under TYPE_CHECKING):

- every module is in one layer, and imports only from its own layer or the layers below;
- the package has no import cycle;
- no onnxfold module is imported inside a function (a deferred import hides a cycle, it does not
  remove it); the optional dependencies, onnx_graphsurgeon, onnx_ir and torch, are imported only in
  their adapters (late, except in onnxfold.ir_pass, which a user imports to get onnx_ir's pass);
- no module is over 600 lines; ``os.fork`` and ``os.waitpid`` appear in one module; the exit codes are
  defined once.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI's lint-imports checks the contract anyway

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnxfold"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The onnxfold modules a ``from ... import ...`` reads (a name that is a module counts as it)."""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if not base.startswith("onnxfold"):
        return []
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in MODULES else base)
    return found


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported onnxfold module, whether inside a function, line) for every import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, inside, child.lineno) for a in child.names if a.name.startswith("onnxfold"))
            elif isinstance(child, ast.ImportFrom):
                found.extend((m, inside, child.lineno) for m in _resolve(module, child))
            visit(child, inside)

    visit(tree, False)
    return [(m if m in MODULES else m.rpartition(".")[0], inside, line) for m, inside, line in found]


def _layers() -> list[list[str]]:
    """The contract's layers, bottom first, as full module names."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    (container,) = config["containers"]
    layers = []
    for entry in reversed(config["layers"]):
        layers.append([f"{container}.{tail.strip()}" for tail in entry.replace("|", ":").split(":")])
    return layers


def _layer_of() -> dict[str, int]:
    """Each module's layer (a module inside a listed package is in its package's layer)."""
    index = {}
    for i, layer in enumerate(_layers()):
        for name in layer:
            index[name] = i
    found = {}
    for module in MODULES:
        owner = next((m for m in sorted(index, key=len, reverse=True) if module == m or module.startswith(m + ".")),
                     None)
        if owner is not None:
            found[module] = index[owner]
    return found


def test_every_module_is_in_one_layer():
    layer = _layer_of()
    unlisted = sorted(set(MODULES) - set(layer) - {"onnxfold"})
    assert not unlisted, f"modules in no layer of pyproject's [tool.importlinter] contract: {unlisted}"


def test_each_layer_imports_only_from_itself_and_below():
    layer = _layer_of()
    upward = [f"{m} (layer {layer[m] + 1}) imports {target} (layer {layer[target] + 1}) at line {line}"
              for m in MODULES if m in layer
              for target, _, line in _imports(m) if target in layer and layer[target] > layer[m]]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(m) if t != m and t in MODULES} for m in MODULES}
    # a package's __init__ re-exports; importing a submodule runs it first but does not import from it,
    # so edges into a package from its own submodules are not counted (onnxfold/__init__ is the API)
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [m, t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                walk(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m, [])
    assert not cycles, "\n".join(cycles)


def test_no_onnxfold_module_is_imported_inside_a_function():
    deferred = [f"{m} line {line}: {target}" for m in MODULES for target, inside, line in _imports(m) if inside]
    assert not deferred, "\n".join(deferred)


def test_optional_dependencies_are_imported_only_in_their_adapters():
    optional = ("onnx_graphsurgeon", "onnx_ir", "torch")
    allowed = {"onnxfold._graphsurgeon": "onnx_graphsurgeon", "onnxfold._onnx_ir": "onnx_ir",
               "onnxfold.ir_pass": "onnx_ir"}
    found = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                root = name.split(".")[0]
                if root in optional and allowed.get(m) != root:
                    found.append(f"{m} imports {name}")
    assert not found, "\n".join(found)


def test_no_module_is_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_one_module_forks_and_waits():
    users = sorted({m for m, p in MODULES.items() for word in ("os.fork(", "os.waitpid(") if word in p.read_text()})
    assert users == ["onnxfold.isolation"], users


def test_exit_codes_are_defined_once():
    defined = []
    for m, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    names = target.elts if isinstance(target, ast.Tuple) else [target]
                    defined += [(m, n.id) for n in names if isinstance(n, ast.Name) and n.id.startswith("EXIT_")]
    assert {m for m, _ in defined} == {"onnxfold.cli"}, defined
    assert len(defined) == len({n for _, n in defined}), defined


def test_every_exception_type_is_defined_in_errors():
    """One module holds every exception type (the user's errors, the bugs' and the internal ones)."""
    import builtins

    bases = {name for name, obj in vars(builtins).items() if isinstance(obj, type) and issubclass(obj, BaseException)}
    elsewhere = []
    defined = {m: {n.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
               for m, p in MODULES.items()}
    exceptions = set(bases)
    changed = True
    while changed:  # classes deriving from an exception, in any module, by name
        changed = False
        for path in MODULES.values():
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name not in exceptions and any(
                        (b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else "")
                        in exceptions for b in node.bases):
                    exceptions.add(node.name)
                    changed = True
    for m, names in defined.items():
        elsewhere += [f"{m}.{n}" for n in names & exceptions if m != "onnxfold.errors"]
    assert not elsewhere, elsewhere
