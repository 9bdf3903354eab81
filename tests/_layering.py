"""The import graph of a package, read with ``ast`` (no module is imported), and the layer check.

Every import counts: module level, inside functions, under ``TYPE_CHECKING``. ``from A import b``
is an edge to ``A.b`` when that is a module of the package, else to ``A``. Edges to modules
outside the package are ignored, and so are the implicit imports of parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Every module of ``package`` (a folder under ``root``): name -> (file, is a package)."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return found


def imports(name: str, path: Path, is_pkg: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` (the package's) that module ``name`` imports anywhere in it."""
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def layer_of(name: str, layers: dict[str, int]) -> int | None:
    """The layer of the longest table entry that is ``name`` or a package holding it."""
    for prefix in sorted(layers, key=len, reverse=True):
        if name == prefix or (name.startswith(prefix + ".") and prefix.count(".")):
            return layers[prefix]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def problems(root: Path, package: str, layers: dict[str, int]) -> list[str]:
    """Modules without a layer, imports that point to a higher layer, and import cycles."""
    found = modules(root, package)
    graph = {name: imports(name, path, is_pkg, set(found)) for name, (path, is_pkg) in found.items()}
    out = [f"{name} has no layer" for name in found if layer_of(name, layers) is None]
    for name, targets in sorted(graph.items()):
        mine = layer_of(name, layers)
        for target in sorted(targets):
            theirs = layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out
