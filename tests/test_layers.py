"""The package's layers, checked on its source with ``ast`` (no import of hpcattn is run).

A module imports only from its own layer or the layers below it::

    ground   errors, dtypes, timing, launch, checkpoint_paths, config
    1        comm, kernels, watchdog, results
    2        graph, collective
    3        methods
    4        model
    5        jobs
    6        cli (and __main__)

and the tests below fail on

* an import against that order (imports inside functions count too);
* an import circle between modules (inside functions too: a circle hidden in a function is still a circle);
* an import of another module's ``_private`` name (``from m import _x``, or ``m._x`` on an imported module);
* an import inside a function of anything but a heavy optional package (:data:`LAZY_PACKAGES`), or
  of an internal module that would load such a package the importing module does not load itself
  (so ``hpcattn report`` or ``hpcattn config`` never load torch or initialise MPI, and the kernels
  load Triton only for a Triton kernel).

Each failure names the file, the line and the rule; README.md's Layout section draws the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hpcattn"

LAYERS = (
    ("errors", "dtypes", "timing", "launch", "checkpoint_paths", "config"),
    ("comm", "kernels", "watchdog", "results"),
    ("graph", "collective"),
    ("methods",),
    ("model",),
    ("jobs",),
    ("cli", "__main__"),
)

# Heavy or optional packages a module may import inside a function, so that importing the module
# stays cheap or works without them (torch: `hpcattn report`, `hpcattn config` and the parser run
# without it; mpi4py: importing it initialises MPI; torch.distributed: not in every torch build).
LAZY_PACKAGES = ("torch", "torch.distributed", "triton", "h5py", "pandas", "mpi4py", "flash_attn", "safetensors",
                 "matplotlib", "tokenizers", "gguf", "jinja2")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def layer(mod: str) -> int:
    """The layer of module ``hpcattn.x.y`` (by its top-level name ``x``; the package itself: ground)."""
    parts = mod.split(".")
    if len(parts) == 1:
        return 0
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{_path(mod)}: hpcattn.{parts[1]} is in no layer of tests/test_layers.py's LAYERS; "
                         f"add it to the layer it belongs to")


class Import:
    """One import statement's internal targets (modules of hpcattn) and the names it binds."""

    def __init__(self, mod: str, node: ast.Import | ast.ImportFrom, in_function: bool):
        self.mod, self.node, self.in_function, self.line = mod, node, in_function, node.lineno
        self.targets: set[str] = set()       # internal modules this statement imports
        self.private: list[str] = []         # another module's _private names it imports
        self.external: list[str] = []        # top-level names of external packages
        if isinstance(node, ast.Import):
            for a in node.names:
                self._add(a.name) if a.name.split(".")[0] == "hpcattn" else self.external.append(a.name)
            return
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
            base = ".".join(pkg[: len(pkg) - (node.level - 1)] + ([base] if base else []))
        if base.split(".")[0] != "hpcattn":
            self.external.append(base)
            return
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in MODULES:
                self._add(sub)                       # a submodule (its package runs first: see heavy())
            else:
                self._add(base)
                if a.name.startswith("_") and not a.name.startswith("__") and base != mod:
                    self.private.append(f"{base}.{a.name}")

    def _add(self, name: str) -> None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):           # `import hpcattn.a.b` imports hpcattn.a.b
            if ".".join(parts[:i]) in MODULES:
                self.targets.add(".".join(parts[:i]))
                return


def _imports(mod: str) -> list[Import]:
    tree = ast.parse(MODULES[mod].read_text(encoding="utf-8"), str(MODULES[mod]))
    out: list[Import] = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(Import(mod, child, in_function))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    walk(tree, False)
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _package(name: str) -> str | None:
    """The entry of LAZY_PACKAGES that external module ``name`` belongs to (the longest), or None."""
    hits = [p for p in LAZY_PACKAGES if name == p or name.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def heavy(mod: str, _seen: set | None = None) -> set[str]:
    """The LAZY_PACKAGES that importing ``mod`` loads: its own top-level imports and those of the
    internal modules it imports at the top (a package's ``__init__`` included)."""
    seen = set() if _seen is None else _seen
    if mod in seen:
        return set()
    seen.add(mod)
    out = set()
    parts = mod.split(".")
    for i in range(1, len(parts)):                     # importing a.b.c runs a and a.b first
        if ".".join(parts[:i]) in MODULES:
            out |= heavy(".".join(parts[:i]), seen)
    for imp in IMPORTS[mod]:
        if imp.in_function:
            continue
        out |= {p for p in map(_package, imp.external) if p}
        for t in imp.targets:
            out |= heavy(t, seen)
    return out


def _path(mod: str) -> str:
    p = MODULES[mod]
    return str(p.relative_to(PACKAGE.parent)) if p.is_relative_to(PACKAGE.parent) else str(p)


def _where(imp: Import) -> str:
    return f"{_path(imp.mod)}:{imp.line}"


def _edges(mod: str) -> set[str]:
    """Modules ``mod`` imports, less a package's own submodules and a submodule's own package (a
    package's face re-exporting its submodules is not a circle with them)."""
    deps = set()
    for imp in IMPORTS[mod]:
        for t in imp.targets:
            if t == mod or (_is_package(mod) and t.startswith(mod + ".")) or \
                    (_is_package(t) and mod.startswith(t + ".")):
                continue
            deps.add(t)
    return deps


def import_circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: _edges(m) for m in MODULES}
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


def test_no_import_circles():
    circles = import_circles()
    assert not circles, "import circles (imports inside functions count):\n" + "\n".join(
        "  " + " <-> ".join(c) for c in circles)


def test_imports_follow_the_layers():
    bad = []
    for m, imps in IMPORTS.items():
        for imp in imps:
            for t in sorted(imp.targets):
                if layer(t) > layer(m):
                    bad.append(f"{_where(imp)}: {m} (layer {layer(m)}) imports {t} (layer {layer(t)}), "
                               f"a layer above it")
    assert not bad, "imports against the layer order " + " -> ".join("/".join(x) for x in LAYERS) + ":\n" + \
        "\n".join(bad)


def test_no_other_modules_private_names():
    bad = []
    for m, imps in IMPORTS.items():
        bound = {}                          # local name -> internal module it is bound to
        for imp in imps:
            bad += [f"{_where(imp)}: {m} imports {name}, another module's private name" for name in imp.private]
            for a in imp.node.names:
                sub = [t for t in imp.targets if t == a.name or t.endswith("." + a.name)]
                if sub and (isinstance(imp.node, ast.ImportFrom) or a.asname):
                    bound[a.asname or a.name] = sub[0]         # a name bound to an internal module
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"), str(MODULES[m]))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                    and node.attr.startswith("_") and not node.attr.startswith("__") and bound[node.value.id] != m:
                bad.append(f"{_path(m)}:{node.lineno}: {m} uses "
                           f"{bound[node.value.id]}.{node.attr}, another module's private name")
    assert not bad, "\n".join(bad)


def test_imports_inside_functions_only_for_heavy_packages():
    bad = []
    for m, imps in IMPORTS.items():
        for imp in imps:
            if not imp.in_function:
                continue
            for name in imp.external:
                if _package(name) is None:
                    bad.append(f"{_where(imp)}: {m} imports {name} inside a function; import it at the top "
                               f"(only {', '.join(LAZY_PACKAGES)} may wait)")
            for t in sorted(imp.targets):
                if not heavy(t) - heavy(m):
                    bad.append(f"{_where(imp)}: {m} imports {t} inside a function, though {t} loads no heavy "
                               f"package that {m} does not load already; import it at the top (an import "
                               f"inside a function is for a heavy optional package, never a way around a "
                               f"circle)")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("source,message", [
    ("from hpcattn.jobs.cases import plan_cases\n", "a layer above it"),
    ("def f():\n    from hpcattn.kernels import select_kernel\n", "inside a function"),
    ("from hpcattn.kernels.merge import _private\n", "private name"),
])
def test_the_rules_catch_what_they_should(tmp_path, monkeypatch, source, message):
    """A module of the method layer that breaks each rule is caught (the checks are not vacuous)."""
    fake = tmp_path / "hpcattn" / "methods" / "bad_example.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "hpcattn.methods.bad_example", fake)
    monkeypatch.setitem(IMPORTS, "hpcattn.methods.bad_example", _imports("hpcattn.methods.bad_example"))
    checks = [test_imports_follow_the_layers, test_no_other_modules_private_names,
              test_imports_inside_functions_only_for_heavy_packages]
    messages = []
    for check in checks:
        try:
            check()
        except AssertionError as e:
            messages.append(str(e))
    assert any(message in m and "bad_example" in m for m in messages), messages
