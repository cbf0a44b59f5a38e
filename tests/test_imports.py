"""No import circles in the package: every module's imports (top-level and inside functions) are read
with `ast`, and the module graph must have no cycle. A circle is found as a strongly connected component
of more than one module (or a module importing itself).

Circles that exist in modules other engineers own are listed in EXPECTED by module name and marked
expected-failing (strict: the entry must go once the circle is gone); the lead removes the entries once
everyone's work is merged."""

from __future__ import annotations

import ast
import tomllib
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# modules on a circle today, outside format/ and the files of the "iofmt" work (owners fix them)
EXPECTED: set[str] = set()


def package_dirs() -> dict[str, Path]:
    """Package name -> folder, from pyproject.toml's [tool.setuptools.package-dir]."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {pkg: ROOT / d for pkg, d in conf["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, d in package_dirs().items():
        for f in d.glob("*.py"):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` (at `path`) imports, by any import statement."""
    is_pkg = path.stem == "__init__"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                mod = ".".join(parent + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]  # `from pkg import sub` imports sub; else pkg
            targets = [t for t in subs if t in known] + ([mod] if any(t not in known for t in subs) else [])
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` imports a.b.c; the nearest known module counts
                t = t.rpartition(".")[0] if "." in t else ""
            if t and (t != name or isinstance(node, ast.Import)):
                out.add(t)
    out.discard(name)
    return out


@lru_cache(maxsize=1)
def cycles() -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    known = modules()
    graph = {m: sorted(imports_of(m, p, known)) for m, p in known.items()}
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            recurse = False
            for j in range(i, len(graph[v])):
                w = graph[v][j]
                if w not in index:
                    work += [(v, j + 1), (w, 0)]
                    recurse = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(frozenset(comp))
            if work:
                u = work[-1][0]
                low[u] = min(low[u], low[v])
    return comps


def test_the_checker_finds_a_circle(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .b import x\n")
    b.write_text("def f():\n    from pkg import a\n")
    known = {"pkg": tmp_path / "__init__.py", "pkg.a": a, "pkg.b": b}
    assert imports_of("pkg.a", a, known) == {"pkg.b"}
    assert imports_of("pkg.b", b, known) == {"pkg.a"}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason="a known circle, owned elsewhere"))
    if m in EXPECTED else m for m in sorted(modules())])
def test_no_import_circle(module):
    on = [sorted(c) for c in cycles() if module in c]
    assert not on, f"{module} is on an import circle: {' -> '.join(on[0])}"
