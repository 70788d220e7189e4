"""The shape of lspt_kernels itself, read from its source with ast: no import cycle (imports inside
functions count), no module importing another module's private names, no function over 80 lines
without a reason written at its top."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lspt_kernels"
ALLOWED_CYCLES: list[set[str]] = []
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"          # the first line of a longer function's body: "# long: <why it stays one function>"


def modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package __init__)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    return out


def _imports(name: str, path: Path, is_package: bool, known: dict):
    """(imported module, imported name or None, ast node) for every import statement of the module,
    at any depth (module level, functions, methods), relative imports resolved."""
    top = next(iter(known)).split(".")[0]
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            parts = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(parts + ([node.module] if node.module else []))
            if module.split(".")[0] == top:
                for alias in node.names:
                    yield module, alias.name, node


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. `from P import m` with m a module is an edge to m
    alone; importing a name defined in a package's __init__ is an edge to that package."""
    known = modules(root)
    graph = {}
    for name, (path, is_package) in known.items():
        deps = set()
        for module, imported, _ in _imports(name, path, is_package, known):
            if imported is not None and f"{module}.{imported}" in known:
                deps.add(f"{module}.{imported}")
            elif module in known:
                deps.add(module)
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    bad = [c for c in cycles(import_graph()) if c not in ALLOWED_CYCLES]
    assert not bad, f"import cycles (function-level imports count): {[sorted(c) for c in bad]}"


def test_the_import_graph_sees_function_level_and_relative_imports(tmp_path):
    """The check above can fail: a cycle hidden in functions, through relative imports, is found."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("class C:\n    def m(self):\n        from ..a import f\n        return f\n")
    (pkg / "c.py").write_text("import toy.sub.b\n")
    graph = import_graph(pkg)
    assert graph["toy.a"] == {"toy.sub.b"} and graph["toy.sub.b"] == {"toy.a"} and graph["toy.c"] == {"toy.sub.b"}
    assert cycles(graph) == [{"toy.a", "toy.sub.b"}]
    assert "lspt_kernels.encoders" in import_graph()["lspt_kernels.bench.methods"]     # imported inside a function


def test_no_module_imports_another_modules_private_names():
    known = modules()
    bad = []
    for name, (path, is_package) in known.items():
        for module, imported, node in _imports(name, path, is_package, known):
            private = imported is not None and imported.startswith("_") and not imported.startswith("__")
            if private and f"{module}.{imported}" not in known and module != name:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {imported} from {module}")
    assert not bad, "make what another module needs public, with a docstring: " + "; ".join(bad)


def _long_functions(root: Path = PACKAGE):
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                first = lines[node.body[0].lineno - 2].strip() if node.body else ""
                if length > MAX_FUNCTION_LINES and not first.startswith(LONG_MARK):
                    yield f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_over_80_lines_without_a_reason():
    bad = list(_long_functions())
    assert not bad, (f"functions over {MAX_FUNCTION_LINES} lines: split them, or say why not on the line after "
                     f"the signature ({LONG_MARK} ...): {bad}")


@pytest.mark.parametrize("marked", [False, True])
def test_a_long_function_needs_the_mark(tmp_path, marked):
    pkg = tmp_path / "toy"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text("def f():\n" + (f"    {LONG_MARK} one table, read top to bottom\n" if marked else "")
                              + body)
    assert list(_long_functions(pkg)) == ([] if marked else ["toy/m.py:1 f (81 lines)"])
