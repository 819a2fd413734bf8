"""The package's import structure (issue 23): who imports whom, read from the source with ``ast``.

Layers: user-facing (the package ``__init__``, ``cli``/``tools`` subpackages, modules named ``cli*``)
-> methods (``fastdarts.methods``) -> core (everything else) -> kernels (``fastdarts.kernels``,
``fastdarts.depthwise_conv``). Every import counts wherever it is (module level, in a function, in a
``try``), except those under ``if TYPE_CHECKING:``, which never run. An import of a package counts as
importing its ``__init__``, and ``import a.b.c`` also runs ``a.b``'s ``__init__`` -- unless the importer
lives inside ``a.b`` (it is initialised already), and never for the top package, whose ``__init__`` is the
user-facing layer that imports everything. Importlib calls with a constant name count too.
"""
from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fastdarts"

# A method or one of its options, as its own word; `_` separates words, so `check_partial_channels`,
# `aux_skip_weight` and `DARTS_PLUS` are hits, while `fastdarts-search`, `darts-search`,
# `edge_normal` and `DARTS_V2` are not.
_METHOD_WORDS = ("partial_channels", "edge_norm", "sample_paths", "aux_skip", "skip_dropout", "max_skip",
                 "early_stop", "pc-darts", "pc_darts", "proxyless", "proxylessnas", "p-darts", "pdarts",
                 "darts_minus", "darts_plus", "sdarts", "perturb_alpha", "perturb_epsilon", "perturb_steps",
                 "beta_decay", "beta-darts", "fair-darts", "fairdarts", "sigmoid_ops", "zero_one_loss",
                 "fair_derivation", "darts-pt", "selection_interval", "selection_batches", "pt_projection")
METHOD_WORD = re.compile(  # options also in their command-line spelling (--partial-channels)
    r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(w).replace("_", "[-_]") for w in _METHOD_WORDS)
    + r")(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9_])darts-(?![A-Za-z])"  # DARTS- (DARTS minus), not darts-search
    r"|(?<![A-Za-z0-9_])darts\+",            # DARTS+
    re.IGNORECASE)


# ---------------------------------------------------------------- the graph builder

@dataclass(frozen=True)
class Import:
    src: str            # importing module
    line: int
    explicit: tuple     # the modules the statement names
    implicit: tuple     # parent packages whose __init__ runs as well
    deferred: bool      # inside a function


@dataclass
class Package:
    root: str                                       # top package name
    files: dict = field(default_factory=dict)       # module -> Path
    packages: set = field(default_factory=set)      # modules that are packages (an __init__.py)
    imports: list = field(default_factory=list)     # [Import]

    @property
    def edges(self) -> dict:
        """module -> {imported module: (line, deferred) of its first import}."""
        graph = {m: {} for m in self.files}
        for imp in self.imports:
            for dst in imp.explicit + imp.implicit:
                if dst != imp.src:
                    graph[imp.src].setdefault(dst, (imp.line, imp.deferred))
        return graph

    def path(self, module: str) -> str:
        return self.files[module].relative_to(self.files[self.root].parents[1]).as_posix()


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


class _Collector(ast.NodeVisitor):
    """Every import statement (and importlib call with a constant name) outside ``if TYPE_CHECKING:``."""

    def __init__(self):
        self.found = []     # (line, kind, module, names, level, deferred)
        self._depth = 0

    def visit_If(self, node):
        self.visit(node.test)
        if not _is_type_checking(node.test):
            for child in node.body:
                self.visit(child)
        for child in node.orelse:
            self.visit(child)

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append((node.lineno, "import", alias.name, (), 0, self._depth > 0))

    def visit_ImportFrom(self, node):
        self.found.append((node.lineno, "from", node.module or "", tuple(a.name for a in node.names),
                           node.level, self._depth > 0))

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if (name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            level = len(target) - len(target.lstrip("."))
            self.found.append((node.lineno, "import", target.lstrip("."), (), level, self._depth > 0))
        self.generic_visit(node)


def build_package(package_dir: Path) -> Package:
    package_dir = Path(package_dir)
    root = package_dir.name
    pkg = Package(root)
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if not all(p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
            pkg.packages.add(".".join(parts))
        pkg.files[".".join(parts)] = path

    def known_prefix(name: str):
        """The longest module of the package that ``name`` starts with, and whether it is all of it."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in pkg.files:
                return candidate, n == len(parts)
        return None, False

    for module, path in pkg.files.items():
        collector = _Collector()
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        here = module if module in pkg.packages else module.rpartition(".")[0]
        # packages initialised before this module runs: its own ancestors, and the top package
        initialised = {root} | {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 1)}
        for line, kind, name, names, level, deferred in collector.found:
            if level:
                base_parts = here.split(".")
                if level - 1 >= len(base_parts):
                    continue  # beyond the top package: an ImportError, not our business
                base = ".".join(base_parts[:len(base_parts) - (level - 1)])
                name = f"{base}.{name}" if name else base
            if name != root and not name.startswith(root + "."):
                continue
            explicit, implied = [], []
            target, exact = known_prefix(name)
            if target is None:
                continue
            if kind == "from" and exact:
                for attr in names:
                    sub = f"{target}.{attr}"
                    # `from p import sub` imports the submodule; `from p import name` reads p's namespace
                    explicit.append(sub if sub in pkg.files else target)
                if any(f"{target}.{attr}" in pkg.files for attr in names):
                    implied.append(target)
            elif exact:
                explicit.append(target)
            else:
                implied.append(target)  # e.g. `import fastdarts._C`: a compiled module under `target`
            for dst in list(explicit) + list(implied):
                parts = dst.split(".")
                implied += [".".join(parts[:n]) for n in range(1, len(parts))]
            explicit = tuple(dict.fromkeys(explicit))
            implicit = tuple(m for m in dict.fromkeys(implied) if m not in explicit and m not in initialised)
            pkg.imports.append(Import(module, line, explicit, implicit, deferred))
    return pkg


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components with more than one module, each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_path(graph: dict, start: str, goal: str, within=None) -> list | None:
    """The shortest import chain start -> ... -> goal (start == goal: a cycle), or None."""
    previous, queue = {}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if within is not None and w not in within:
                continue
            if w == goal:
                chain = [v]
                while chain[-1] != start:
                    chain.append(previous[chain[-1]])
                return chain[::-1] + [goal]
            if w not in previous and w != start:
                previous[w] = v
                queue.append(w)
    return None


def describe_chain(graph: dict, chain: list) -> str:
    """`a (line 42) -> b (line 608, in a function) -> a`: each arrow's line is in the module on its left."""
    out = []
    for v, w in zip(chain, chain[1:]):
        line, deferred = graph[v][w]
        out.append(f"{v} (line {line}{', in a function' if deferred else ''})")
    return " -> ".join(out + [chain[-1]])


def find_cycles(pkg: Package) -> list:
    """One readable cycle through each module of each import cycle (deduplicated)."""
    graph = pkg.edges
    cycles = []
    for component in strongly_connected(graph):
        seen = set()
        for v in component:
            chain = shortest_path(graph, v, v, within=set(component))
            i = chain.index(min(chain[:-1]))
            key = tuple(chain[i:-1] + chain[:i])
            if key not in seen:
                seen.add(key)
                cycles.append(describe_chain(graph, list(key) + [key[0]]))
    return cycles


# ---------------------------------------------------------------- the layers

def is_methods(pkg: Package, module: str) -> bool:
    methods = f"{pkg.root}.methods"
    return module == methods or module.startswith(methods + ".")


def is_user_facing(pkg: Package, module: str) -> bool:
    parts = module.split(".")
    package_parts = parts[1:] if module in pkg.packages else parts[1:-1]
    return (module == pkg.root or any(p in ("cli", "tools") for p in package_parts)
            or (module not in pkg.packages and parts[-1].startswith("cli")))


def core_modules(pkg: Package) -> list:
    return [m for m in sorted(pkg.files) if not is_methods(pkg, m) and not is_user_facing(pkg, m)]


def kernel_modules(pkg: Package) -> set:
    kernels = f"{pkg.root}.kernels"
    return {m for m in pkg.files
            if m == kernels or m.startswith(kernels + ".") or m == f"{pkg.root}.depthwise_conv"}


def defining_module(pkg: Package, function: str) -> list:
    return sorted(m for m, path in pkg.files.items()
                  if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == function
                         for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))))


def method_word_hits(pkg: Package, module: str) -> list:
    """`path:line: word, word` for each line of ``module`` naming a method or an option."""
    hits = []
    for number, text in enumerate(pkg.files[module].read_text(encoding="utf-8").splitlines(), 1):
        words = dict.fromkeys(m.group(0) for m in METHOD_WORD.finditer(text))
        if words:
            hits.append(f"{pkg.path(module)}:{number}: {', '.join(words)}")
    return hits


def _imports_from(pkg: Package, module: str, allowed) -> list:
    """`path:line: imports X` for each import statement of ``module`` reaching a module not ``allowed``."""
    out = []
    for imp in pkg.imports:
        if imp.src != module:
            continue
        bad = [m for m in imp.explicit if not allowed(m)] or [m for m in imp.implicit if not allowed(m)]
        if bad:
            where = " (in a function)" if imp.deferred else ""
            out.append(f"{pkg.path(module)}:{imp.line}: imports {', '.join(bad)}{where}")
    return out


def _fail_on(title: str, offenders: list):
    if offenders:
        pytest.fail(f"{len(offenders)} {title}:\n  " + "\n  ".join(offenders), pytrace=False)


# ---------------------------------------------------------------- the package's rules

def test_no_import_cycles():
    """A cycle makes import order matter (half-initialised modules) and is what tempts imports inside functions."""
    cycles = find_cycles(build_package(PACKAGE_DIR))
    _fail_on("import cycles (an import inside a function is still an import)", cycles)


def test_core_does_not_import_methods():
    """Methods plug into the core from above: the core must work, and be readable, without any of them."""
    pkg = build_package(PACKAGE_DIR)
    offenders = [o for m in core_modules(pkg) for o in _imports_from(pkg, m, lambda t: not is_methods(pkg, t))]
    _fail_on("imports of the methods package from outside it and the user-facing layer", offenders)


def test_core_does_not_name_methods():
    """A core that names a method or its options has the method's logic in it, whatever it imports."""
    pkg = build_package(PACKAGE_DIR)
    hits = [h for m in core_modules(pkg) for h in method_word_hits(pkg, m)]
    files = len({h.split(":")[0] for h in hits})
    _fail_on(f"lines naming a method or its options in {files} core files", hits)


def test_layers_point_one_way():
    """user-facing -> methods -> core -> kernels; the reference mixed op is the spec the fused backend is checked
    against, so it must not depend on that backend."""
    pkg = build_package(PACKAGE_DIR)
    kernels = kernel_modules(pkg)
    errors = f"{pkg.root}.errors"
    offenders = []
    for m in sorted(kernels):  # kernels: other kernels and the error type only
        offenders += [f"kernel {o}" for o in _imports_from(pkg, m, lambda t: t in kernels or t == errors)]
    for m in sorted(pkg.files):  # nothing below the user-facing layer imports it
        if not is_user_facing(pkg, m):
            offenders += [f"below the user-facing layer: {o}"
                          for o in _imports_from(pkg, m, lambda t: not is_user_facing(pkg, t))]
    # the backends, found by what they define (files move): no reference module may reach a fused one
    reference, fused = defining_module(pkg, "mixed_op_reference"), defining_module(pkg, "mixed_op_fused")
    assert reference and fused, f"no module defines mixed_op_reference ({reference}) or mixed_op_fused ({fused})"
    graph = pkg.edges
    for ref in reference:
        for fast in fused:
            chain = [ref] if ref == fast else shortest_path(graph, ref, fast)
            if chain:
                offenders.append(f"the reference mixed op reaches the fused backend: {describe_chain(graph, chain)}"
                                 + (" (one module defines both)" if ref == fast else ""))
    _fail_on("imports against the layering", offenders)


# ---------------------------------------------------------------- the checker itself

def _make(tmp_path: Path, files: dict) -> Package:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return build_package(tmp_path / "pkg")


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = _make(tmp_path, {"__init__.py": "from .a import f\n",
                           "a.py": "from . import b\n\ndef f():\n    return b\n",
                           "b.py": "def g():\n    from .a import f\n    return f\n"})
    assert find_cycles(pkg) == ["pkg.a (line 1) -> pkg.b (line 2, in a function) -> pkg.a"]


def test_checker_ignores_type_checking_imports(tmp_path):
    pkg = _make(tmp_path, {"__init__.py": "",
                           "a.py": "import typing\nfrom typing import TYPE_CHECKING\nfrom . import b\n"
                                   "if TYPE_CHECKING:\n    from .b import B\n"
                                   "if typing.TYPE_CHECKING:\n    import pkg.b\n",
                           "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import A\n"
                                   "else:\n    import json\n"})
    assert find_cycles(pkg) == []
    assert pkg.edges["pkg.b"] == {}
    # the else branch of `if TYPE_CHECKING:` runs: it counts
    pkg = _make(tmp_path, {"b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    pass\n"
                                   "else:\n    from .a import A\n"})
    assert find_cycles(pkg) == ["pkg.a (line 3) -> pkg.b (line 5) -> pkg.a"]


def test_checker_resolves_relative_imports(tmp_path):
    pkg = _make(tmp_path, {"__init__.py": "", "x.py": "", "sub/__init__.py": "", "sub/sibling.py": "",
                           "sub2/__init__.py": "", "sub2/n.py": "",
                           "sub/m.py": "from ..x import y\nfrom ..sub2.n import z\nfrom . import sibling\n"
                                       "import pkg.sub2\nimport importlib\nimportlib.import_module('pkg.x')\n"})
    assert pkg.edges["pkg.sub.m"] == {"pkg.x": (1, False), "pkg.sub2.n": (2, False), "pkg.sub2": (2, False),
                                      "pkg.sub.sibling": (3, False)}
    # the sub-package's own __init__ ran before m: importing a sibling is not an edge to it
    assert "pkg.sub" not in pkg.edges["pkg.sub.m"]


def test_checker_finds_a_cycle_through_a_package_init(tmp_path):
    pkg = _make(tmp_path, {"__init__.py": "from .other import f\nfrom .sub import g\n",
                           "other.py": "from .sub.m import g\n",
                           "sub/__init__.py": "from ..other import h\n", "sub/m.py": ""})
    # the top package's __init__ imports everything: submodules do not implicitly import it
    assert find_cycles(pkg) == ["pkg.other (line 1) -> pkg.sub (line 1) -> pkg.other"]


def test_checker_layers(tmp_path):
    pkg = _make(tmp_path, {"__init__.py": "", "cli.py": "", "cli_rank.py": "", "tools/__init__.py": "",
                           "tools/bench.py": "", "methods/__init__.py": "", "methods/pc.py": "",
                           "core.py": "def f():\n    from .methods.pc import g\n", "client_state/__init__.py": ""})
    assert core_modules(pkg) == ["pkg.client_state", "pkg.core"]
    assert _imports_from(pkg, "pkg.core", lambda t: not is_methods(pkg, t)) == [
        "pkg/core.py:2: imports pkg.methods.pc (in a function)"]


def test_checker_method_words():
    hits = ["PC-DARTS", "pc_darts", "check_partial_channels(x)", "cfg.aux_skip_weight", "DARTS-'s", "DARTS- and",
            "(DARTS+)", "P-DARTS", "pdarts_stages", "--sample-paths", "sample_paths=2", "EARLY_STOP",
            "ProxylessNAS", "proxyless", "darts_minus"]
    misses = ["fastdarts-search", "fastdarts", "darts-search", "DARTS_V2", "DARTS", "edge_normal", "early_stopping",
              "resample_paths", "max_skipped"]
    assert [h for h in hits if not METHOD_WORD.search(h)] == []
    assert [m for m in misses if METHOD_WORD.search(m)] == []
