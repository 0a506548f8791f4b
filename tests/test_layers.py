"""The import graph of src/deepsynth points one way: no import cycle, and no import from a stage to
one after it in the order of docs/architecture.md.

Every module is parsed with `ast` (nothing is imported); every `import` / `from ... import`
naming a deepsynth module counts, at module level, inside functions (usually a way to hide a
cycle, so counted too, but reported apart) and under ``if TYPE_CHECKING:`` (no runtime cycle,
but still knowledge of the module it names: it counts for the order of stages, not for cycles).

Stages, lowest first (a module may import its own stage and those before it):

* ``base``: shared utilities every stage may use and which import no other deepsynth module:
  ``atomic`` (crash-safe writes), ``storage`` (paths and URIs),
  ``cluster`` (connecting to Ray), ``cli_errors`` (how a command reports a failure);
* ``render``, ``data``, ``models``, ``training``, ``evaluation``, ``inference``, ``serve``: the
  packages of those names;
* ``vllm``: all vLLM code in one package, whose modules are placed one by one in the stage they
  serve (``VLLM_STAGE``): the plugin (``deepsynth.vllm``, registering the model families with vLLM),
  its decoding guards, the export to vLLM's native layout and the checkpoint step (where vLLM loads
  a resolved model from: weights, processor, LoRA module) belong to ``models`` and import only
  ``models``; the engine (and its driver thread), the parity and the reference checks belong
  to ``inference``; its ``cli.py`` and ``check.py`` to ``cli``;
* ``cli``: the front doors on top of everything: the package ``deepsynth`` itself (its lazy
  ``deepsynth.evaluate`` / ``deepsynth.predict``, the library's entry points), the command line
  ``deepsynth.cli``, every stage's ``cli.py`` (and
  ``vllm/cli.py``), ``demo`` (the end-to-end demo behind ``deepsynth demo``) and
  ``vllm/check.py`` (the command that checks a vLLM environment, ``make vllm-env``).

Pairs found when this test was written and not fixed yet are listed below: the test fails when a
pair not listed appears (nothing new creeps in) and when a listed pair is gone (the list shrinks
with each fix: delete the pair).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

STAGES = ("base", "render", "data", "models", "training", "evaluation", "inference", "serve", "cli")
BASE = {"deepsynth.atomic", "deepsynth.storage", "deepsynth.cluster", "deepsynth.cli_errors"}
TOP_CLI = {"deepsynth", "deepsynth.cli", "deepsynth.demo", "deepsynth.vllm.check"}
PACKAGE_STAGE = {"render": "render", "data": "data", "models": "models",
                 "training": "training", "evaluation": "evaluation", "inference": "inference", "serve": "serve"}
#: deepsynth.vllm spans stages: each of its modules sits in the stage it serves (a new one must be placed here).
VLLM_STAGE = {"deepsynth.vllm": "models", "deepsynth.vllm.guards": "models", "deepsynth.vllm.export": "models",
              "deepsynth.vllm.checkpoint": "models", "deepsynth.vllm.engine": "inference",
              "deepsynth.vllm.driver": "inference", "deepsynth.vllm.parity": "inference",
              "deepsynth.vllm.reference": "inference"}

#: (importer, imported) against the order of stages, found today.
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: Import edges on a cycle, found today: (importer, imported) -> "module" when the importer
#: imports at module level, "function" when only inside a function. None left.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "deepsynth").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def stage_of(module: str) -> str:
    parts = module.split(".")
    if module in BASE:
        return "base"
    if module in TOP_CLI or parts[-1].endswith("cli") and len(parts) > 2:
        return "cli"
    if module in VLLM_STAGE:
        return VLLM_STAGE[module]
    if len(parts) > 1 and parts[1] in PACKAGE_STAGE:
        return PACKAGE_STAGE[parts[1]]
    raise AssertionError(f"{module} has no stage: place it in tests/test_layers.py (and docs/architecture.md)")


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The deepsynth modules an import statement loads (a name imported from a package is its
    submodule when there is one, else the package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = package[:len(package) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:  # `import deepsynth.render.x.y`-style attribute paths
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_graph() -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> the kinds of its imports: "module", "function", "type"."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)

    def visit(module: str, node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                child_kind = "function"
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                child_kind = "type"
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, child):
                    edges[(module, target)].add(child_kind)
            visit(module, child, child_kind)

    for module, path in MODULES.items():
        visit(module, ast.parse(path.read_text(encoding="utf-8"), str(path)), "module")
    return edges


def cycle_edges(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges whose two ends lie on one cycle (in one strongly connected component)."""
    succ: dict[str, list[str]] = defaultdict(list)
    for a, b in edges:
        succ[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    component: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for root in sorted({m for edge in edges for m in edge}):  # Tarjan, iteratively
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component[member] = index[node]
                        if member == node:
                            break
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(succ[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return {(a, b) for a, b in edges if component[a] == component[b]}


def _report(title: str, pairs) -> str:
    return title + "".join(f"\n    {pair!r}," for pair in sorted(pairs))


def test_every_module_is_parsed_and_placed():
    edges = import_graph()
    assert {"deepsynth.render.renderer", "deepsynth.data.pipeline", "deepsynth.serve.app"} <= set(MODULES)
    # a module-level import, one inside a function and one under TYPE_CHECKING are all seen
    assert edges[("deepsynth.render.renderer", "deepsynth.render.markdown")] == {"module"}
    assert "function" in edges[("deepsynth.data.prepare", "deepsynth.data.ray_prepare")]
    assert edges[("deepsynth.render.wrap", "deepsynth.render.config")] == {"type"}
    for module in MODULES:
        assert stage_of(module) in STAGES


def test_cycle_edges_are_the_edges_inside_a_cycle():
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("e", "d"), ("f", "a")}
    assert cycle_edges(edges) == {("a", "b"), ("b", "c"), ("c", "a"), ("d", "e"), ("e", "d")}
    assert cycle_edges({("a", "b"), ("b", "c")}) == set()


def test_no_import_against_the_order_of_stages():
    found = {(a, b) for a, b in import_graph() if STAGES.index(stage_of(b)) > STAGES.index(stage_of(a))}
    new, fixed = found - KNOWN_UPWARD, KNOWN_UPWARD - found
    assert not new, _report(f"imports from a stage to a later one ({' -> '.join(STAGES)}); import the other "
                            "way round or move the code to the stage that owns it:", new)
    assert not fixed, _report("fixed, well done: delete these pairs from KNOWN_UPWARD:", fixed)


def test_no_import_cycle():
    edges = import_graph()
    runtime = {edge for edge, kinds in edges.items() if kinds - {"type"}}
    found = {edge: ("module" if "module" in edges[edge] else "function") for edge in cycle_edges(runtime)}
    module_level = cycle_edges({edge for edge in runtime if "module" in edges[edge]})
    new = {edge: kind for edge, kind in found.items() if KNOWN_CYCLE_EDGES.get(edge) != kind}
    fixed = {edge: kind for edge, kind in KNOWN_CYCLE_EDGES.items() if found.get(edge) != kind}
    assert not module_level - set(KNOWN_CYCLE_EDGES), _report(
        "import cycles at module level (new):", module_level - set(KNOWN_CYCLE_EDGES))
    assert not new, _report("import edges on a cycle (new; an import inside a function does not break a "
                            "cycle): (importer, imported): kind", new.items())
    assert not fixed, _report("fixed, well done: delete these from KNOWN_CYCLE_EDGES:", fixed.items())
