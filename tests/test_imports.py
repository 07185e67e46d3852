"""The package's import graph (read from the source with ast): no cycles, and imports only downward (DESIGN.md §4)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ase_tds"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """{module: the ase_tds modules it imports (anywhere in it, lazily inside functions too)}."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {target for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def _top_level(graph) -> dict[str, set[str]]:
    """Only the imports executed when the module is imported (module level, not inside functions)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    top = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.parse(path.read_text()).body:
            nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
            for item in nodes:
                if isinstance(item, ast.ImportFrom):
                    if item.level:
                        base = package.split(".")[:len(package.split(".")) - item.level + 1]
                        stem = ".".join(base + ([item.module] if item.module else []))
                    else:
                        stem = item.module or ""
                    targets = [stem] + [f"{stem}.{alias.name}" for alias in item.names]
                elif isinstance(item, ast.Import):
                    targets = [alias.name for alias in item.names]
                else:
                    continue
                found |= {t for t in targets if t in modules and t != name}
        top[name] = found
    return top


def _cycle(graph) -> list[str]:
    """One import cycle of `graph` (a list of modules, the first repeated at the end), or []."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for other in sorted(graph[node]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other] if other in path else [node, other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return []


def test_no_import_cycles_at_import_time():
    graph = _top_level(_imports())
    # a submodule importing its package's __init__ (e.g. `from . import x`) goes through the package: keep edges
    # between modules, dropping the edge a submodule has to its own parent package's __init__ re-exports
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    assert _cycle(graph) == []


def _within(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_imports_go_downward():
    graph = _imports()
    rules = {  # importer: what it never imports
        ("ase_tds.forward",): ("ase_tds.fitting", "ase_tds.cli"),
        ("ase_tds.io",): ("ase_tds.fitting", "ase_tds.forward", "ase_tds.cli"),
        ("ase_tds.model", "ase_tds.covariance", "ase_tds.scattering"): ("ase_tds.forward", "ase_tds.fitting",
                                                                         "ase_tds.cli"),
    }
    wrong = [f"{name} imports {target}" for importers, forbidden in rules.items() for name, targets in graph.items()
             if _within(name, importers) for target in targets if _within(target, forbidden)]
    wrong += [f"{name} imports ase_tds.cli" for name, targets in graph.items()
              if name not in ("ase_tds.cli", "ase_tds.__main__") and "ase_tds.cli" in targets]
    assert wrong == []
