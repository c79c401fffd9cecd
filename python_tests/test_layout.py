"""The package's layering, from its import graph (module-level imports only; an import inside a
function is a late binding, not a layer's dependency): no cycles, and no module imports one of a
higher layer.  Run as a script to print the graph."""
import ast
import pathlib
import sys
from typing import Dict, Set

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "xma2_ops"

# Lowest first; a module may import its own layer and those below.  The most specific prefix counts.
LAYERS = [
    ("xma2_ops.config", "xma2_ops.device", "xma2_ops.quant"),
    ("xma2_ops.checks", "xma2_ops.lowering", "xma2_ops.programmed"),
    ("xma2_ops.backends",),
    ("xma2_ops.ops",),
    ("xma2_ops.forward",),
    ("xma2_ops.functional", "xma2_ops.crossbar"),
    ("xma2_ops.modules",),
    ("xma2_ops.calibration",),
    ("xma2_ops.models",),
    ("xma2_ops",),  # the public API (__init__.py)
    ("xma2_ops.mta",),  # multi-task adaption: it may use the public API
    ("xma2_ops.mta.experiment",),  # the experiment over the mta library
    ("xma2_ops.mta.__main__",),  # its command line
]


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


# Compiled modules (the C++ extension): imported, but no Python module of the graph.
_EXTENSIONS = {f"xma2_ops.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.so")} | {"xma2_ops._C"}


def _top_level_imports(tree: ast.Module):
    """Import nodes executed when the module is imported (not inside a function or class)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


def import_graph() -> Dict[str, Set[str]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                if node.level:
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                else:
                    base = ""
                base = ".".join(p for p in (base, node.module) if p)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods or f"{base}.{a.name}" in _EXTENSIONS
                           else base for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, module
    return best


def test_no_import_cycles():
    graph = import_graph()
    state: Dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path + [t])}"
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def test_the_core_does_not_import_mta():
    graph = import_graph()
    core = [m for m in graph if not (m.startswith("xma2_ops.mta") or m == "xma2_ops.models")]
    bad = [f"{a} imports {b}" for a in core for b in graph[a] if b.startswith("xma2_ops.mta")]
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    for m, targets in sorted(import_graph().items(), key=lambda kv: (layer(kv[0]), kv[0])):
        print(f"[{layer(m)}] {m} -> {', '.join(sorted(targets)) or '-'}", file=sys.stdout)
