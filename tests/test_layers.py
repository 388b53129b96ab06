"""The package's imports point one way: no circle among dico_scale's modules (imports run when a module loads), and
no module of the library imports an entry point (entry points import the library, never the reverse). Read from
the source with `ast`: nothing is imported, so this takes well under a second."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dico_scale"
ENTRY_POINTS = {f"dico_scale.{name}" for name in ("train", "demo", "evaluate", "compare", "caption")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dico_scale modules an import statement loads: `from .x import y` loads x, and y too when y is a module
    (checked against the files by the caller); `from . import y` loads y."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    if node.level:
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    return [base] + [f"{base}.{a.name}" for a in node.names]


def module_level(tree: ast.Module, functions: bool = False):
    """Import statements that run when the module loads (with functions=True: or when a function runs); never those
    under `if TYPE_CHECKING:`, which no run executes."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if not functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: dico_scale modules it imports at load time}, {module: every dico_scale module it imports anywhere})."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    loading, anywhere = {}, {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        package = path.name == "__init__.py"

        def known(nodes):
            return {t for node in nodes for t in targets(node, name, package) if t in files and t != name}
        loading[name] = known(module_level(tree))
        anywhere[name] = known(module_level(tree, functions=True))
    return loading, anywhere


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    loading, anywhere = import_graph()
    assert len(loading) > 40  # the walk found the package
    cycle = find_cycle(loading)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # Also none closed by an import inside a function (config.validate -> models.weights -> config was one): such
    # a circle loads today only because of where one import sits, and breaks when someone moves it up.
    cycle = find_cycle(anywhere)
    assert cycle is None, "import cycle through a function-level import: " + " -> ".join(cycle)


def test_no_module_imports_an_entry_point():
    _, anywhere = import_graph()
    offenders = sorted(f"{m} imports {t}" for m, ts in anywhere.items() for t in ts & ENTRY_POINTS)
    assert offenders == []


def test_the_checks_see_cycles_and_relative_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("from ..config import Config\nfrom . import base\nimport dico_scale.errors\n"
                     "def f():\n    from ..train import data_shards\n")
    loads = [t for n in module_level(tree) for t in targets(n, "dico_scale.stages.dico", False)]
    assert {"dico_scale.config", "dico_scale.stages.base", "dico_scale.errors"} <= set(loads)
    assert "dico_scale.train" not in loads
    anywhere = [t for n in module_level(tree, functions=True) for t in targets(n, "dico_scale.stages.dico", False)]
    assert "dico_scale.train" in anywhere
    # An import only type checkers read closes no circle: no run executes it.
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import Config\n")
    assert [n for n in module_level(tree, functions=True) if "config" in ast.unparse(n)] == []
