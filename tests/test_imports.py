"""Import structure of the package: no import cycle through the op layer (function-level imports count).

The graph is read from the sources (every `import` / `from ... import`, at any depth of a module);
`from . import name` of a submodule is an edge to that submodule only. The op layer (the op, its
backends, the eager step, the contract, the self-check, the kernels' loaders, the step benchmarks)
must be in no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import lspt_kernels

ROOT = Path(lspt_kernels.__file__).resolve().parent
OP_LAYER = ("ops", "backends", "eager", "contract", "precision", "selfcheck", "triton_kernels", "_build",
            "bench.step", "bench.host", "bench.compiled", "bench.gpu_suite", "bench.env")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_cycle_through_the_op_layer():
    graph = import_graph()
    layer = {f"lspt_kernels.{m}" for m in OP_LAYER}
    assert layer <= set(graph), sorted(layer - set(graph))
    bad = [c for c in cycles(graph) if layer & set(c)]
    assert not bad, "import cycles: " + "; ".join(" -> ".join(c) for c in bad)


def test_selfcheck_is_handed_the_step():
    """The self-check imports neither the op nor anything that imports it."""
    graph = import_graph()
    assert "lspt_kernels.ops" not in graph["lspt_kernels.selfcheck"]
    assert "lspt_kernels.ops" not in graph["lspt_kernels.backends"]
