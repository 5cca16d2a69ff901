"""The package's shape, checked by reading its source (AST), not by importing it.

- Floors: every module imports only floors below its own (or its own package); no import cycle
  between modules, counting imports inside functions too; only cli/ imports argparse.
- The KV cache owns its state: no module but model/cache.py reaches into a cache's private fields,
  assigns to its fields, or builds one behind its constructors.

Each checker is also run on a small package written with the faults it must find, so a checker
that finds nothing cannot pass unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import gemma3

PACKAGE = Path(gemma3.__file__).parent
# Lowest first. A module may import modules of its own package and of lower floors only; the
# root package (gemma3/__init__: the public API, and __main__) sits just below cli.
FLOORS = [("model",), ("formats",), ("cpu",), ("quant",), ("inference",), ("server", "train"), ("eval",),
          ("study",), ("",), ("cli",), ("__main__",)]
CACHE_MODULE = "model/cache.py"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name (relative to the root package, "" for its __init__) -> file."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the root package, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    package = [p for p in package if p]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "gemma3":
                target = node.module.partition(".")[2]
            else:
                continue
            subs = [f"{target}.{a.name}".strip(".") for a in node.names if f"{target}.{a.name}".strip(".") in known]
            found += [(s, node.lineno) for s in subs] or [(target, node.lineno)]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "gemma3":
                    found.append((a.name.partition(".")[2], node.lineno))
    return found


def floor(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"module {module!r} is on no floor: add its package to FLOORS")


def layer_violations(root: Path) -> list[str]:
    mods = modules(root)
    problems = []
    for name, path in mods.items():
        for target, line in imports(name, path, set(mods)):
            same_package = target.split(".")[0] == name.split(".")[0] and floor(name) != floor("")
            if target == "" and name not in ("", "__main__"):
                problems.append(f"{path.name}:{line} {name} imports the root package (import the module itself)")
            elif not same_package and floor(target) >= floor(name) and target != name:
                problems.append(f"{path.relative_to(root)}:{line} {name or '(root)'} imports {target} "
                                f"(floor {floor(target)} is not below its floor {floor(name)})")
    return problems


def cycles(root: Path) -> list[list[str]]:
    mods = modules(root)
    graph = {name: sorted({t for t, _ in imports(name, path, set(mods)) if t in mods and t != name})
             for name, path in mods.items()}
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open":
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n)
    return found


def argparse_outside_cli(root: Path) -> list[str]:
    out = []
    for name, path in modules(root).items():
        if name.split(".")[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                out.append(f"{path.relative_to(root)}:{node.lineno}")
    return out


def cache_intrusions(root: Path) -> list[str]:
    """Places outside the cache module that read its private fields, assign to fields of its
    classes, build one through __new__, or reach into an object's __dict__ for a cache."""
    cache_tree = ast.parse((root / CACHE_MODULE).read_text())
    classes = {n.name for n in cache_tree.body if isinstance(n, ast.ClassDef)}
    private, public = set(), set()
    for node in ast.walk(cache_tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            (private if node.attr.startswith("_") and not node.attr.startswith("__") else public).add(node.attr)
        if isinstance(node, ast.FunctionDef) and any(isinstance(d, ast.Name) and d.id == "property"
                                                     for d in node.decorator_list):
            public.add(node.name)
    out = []
    for name, path in modules(root).items():
        if path == root / CACHE_MODULE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr in private and not _is_self(node.value):
                out.append(f"{where} reads the cache's private field {node.attr}")
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in public and not _is_self(t.value):
                    out.append(f"{where} assigns {ast.unparse(t)}")
            if (isinstance(node, ast.Attribute) and node.attr == "__new__" and isinstance(node.value, ast.Name)
                    and node.value.id in classes):
                out.append(f"{where} builds a {node.value.id} through __new__")
            if isinstance(node, ast.Attribute) and node.attr == "__dict__" and "cache" in ast.unparse(node.value).lower():
                out.append(f"{where} reaches into {ast.unparse(node.value)}.__dict__")
    return out


def _is_self(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


# ---- the package itself ---------------------------------------------------------------------------


def test_every_floor_imports_only_downward():
    assert layer_violations(PACKAGE) == []


def test_no_import_cycle():
    assert cycles(PACKAGE) == []


def test_only_cli_parses_arguments():
    assert argparse_outside_cli(PACKAGE) == []


def test_only_the_cache_changes_the_cache():
    assert cache_intrusions(PACKAGE) == []


# ---- the checkers find what they are for ----------------------------------------------------------


def test_checkers_find_planted_faults(tmp_path):
    """A copy of the real cache module plus modules with one fault each: every checker reports
    exactly its fault."""
    root = tmp_path / "pkg"
    files = {
        "__init__.py": "",
        "model/__init__.py": "",
        CACHE_MODULE: (PACKAGE / CACHE_MODULE).read_text(),
        "model/decoder.py": "from ..cli import run\n",  # a lower floor importing the top one
        "formats/__init__.py": "",
        "formats/a.py": "def f():\n    from . import b\n",  # a cycle through a lazy import
        "formats/b.py": "from .a import f\nimport argparse\n",
        "cli/__init__.py": "",
        "cli/run.py": "import argparse\n",
        "inference/__init__.py": "",
        "inference/pc.py": ("def restore(cache, n, KVCache):\n    cache.pos = n\n    cache._layers[0] = None\n"
                            "    c = KVCache.__new__(KVCache)\n    return cache.__dict__\n"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert [v.split(" imports ")[1].split(" ")[0] for v in layer_violations(root)] == ["cli.run"]
    assert cycles(root) == [["formats.a", "formats.b", "formats.a"]]
    assert argparse_outside_cli(root) == ["formats/b.py:2"]
    found = cache_intrusions(root)
    assert len(found) == 4 and all(f.startswith("inference/pc.py") for f in found), found
