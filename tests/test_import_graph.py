"""The `cmal` package's import graph, read from the source: no module imports itself through others (function-level
imports count too: a lazy cycle is still a tangle), and the layers point one way (the data layer and the Hub code
import no training module)."""

import ast
import tomllib
from pathlib import Path

import pytest
from conftest import REPO


def package_modules() -> dict[str, Path]:
    """{module name: file} of every module `pyproject.toml` installs under `cmal`."""
    folders = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    modules = {}
    for package, folder in folders.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            modules[".".join((package, *parts)).removesuffix(".__init__")] = path
    return modules


def imported(name: str, path: Path, known) -> set[str]:
    """The modules of `known` that `path` imports anywhere in its body (`from a import b` counts a.b when b is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module if not node.level else ".".join(filter(None, (base, node.module)))
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative over the sorted graph)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target), on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
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
                        found.append(sorted(component))
    return found


@pytest.fixture(scope="module")
def graph():
    modules = package_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_the_package(graph):
    assert {"cmal.training.loop", "cmal.training.data.region_store", "cmal.model_cards.render", "cmal.endpoint.handler"} <= set(graph)
    assert "cmal.training.run_folder" in graph["cmal.training.loop"]  # `from cmal.training.run_folder import ...`
    assert "cmal.modeling_cmal.configuration_cmal" in graph["cmal.modeling_cmal.modeling_cmal"]  # a relative import


def test_no_import_cycles(graph):
    assert cycles(graph) == [], "modules that import each other (through others): move what they share to one of them"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"x": {"y"}, "y": {"x"}, "p": {"q"}, "q": {"p"}}) == [["p", "q"], ["x", "y"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


# What each layer may import of the package. The data layer reads and writes data: of training, only the metrics
# (`downstream.py` normalises VQA answers as the metric does); the model and processor folders are Hub remote code,
# which must load with nothing else of the package.
ALLOWED = {
    "cmal.training.data": ("cmal.training.data", "cmal.training.metrics", "cmal.processors", "cmal.modeling_cmal"),
    "cmal.training.metrics": ("cmal.training.metrics",),
    "cmal.modeling_cmal": ("cmal.modeling_cmal", "cmal.processors"),
    "cmal.processors": ("cmal.processors", "cmal.modeling_cmal"),
}  # fmt: skip


@pytest.mark.parametrize("layer", ALLOWED)
def test_layers_import_only_what_they_may(layer, graph):
    allowed = ALLOWED[layer]
    wrong = [f"{name} -> {target}" for name, targets in graph.items() if name == layer or name.startswith(layer + ".")
             for target in sorted(targets) if not any(target == a or target.startswith(a + ".") for a in allowed)]  # fmt: skip
    assert not wrong, f"{layer} may import only {allowed}:\n" + "\n".join(wrong)
