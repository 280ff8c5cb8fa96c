"""The package's shape, read from its source without running it: the library at the top imports nothing of
the application, arrows between the application's layers only point down, there is no import circle,
`jobs.compare` imports no other job, and imports sit at module level (the CLI's lazy ones excepted)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "platform", "fmm")
# The application's layers, lowest first; every module outside them (and outside cli) is the library.
LAYERS = ["infra", "experiment", "evaluation", "worker", "jobs"]


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


MODULES = modules()


def layer(module: str) -> int:
    """0 for the library, 1.. for the application's layers in LAYERS order, len(LAYERS) + 1 for the CLI."""
    parts = module.split(".")
    if parts[1:2] == ["cli"]:
        return len(LAYERS) + 1
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported fmm module, line, at module level) for each import of `module`."""
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fmm.x import y` imports fmm.x.y when y is a module, else fmm.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        found += [(name, node.lineno, id(node) in top) for name in names if name.split(".")[0] == "fmm"]
    return found


EDGES = {module: imports(module) for module in MODULES}


def test_the_library_and_every_layer_import_only_downwards():
    bad = [f"{a} (line {line}) imports {b}" for a, edges in EDGES.items() for b, line, _ in edges
           if b in MODULES and layer(b) > layer(a)]
    assert not bad, "imports against the direction of use: " + "; ".join(bad)


def test_there_is_no_import_circle():
    graph = {a: sorted({b for b, _, _ in edges if b in MODULES and b != a}) for a, edges in EDGES.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_compare_imports_no_other_job():
    others = [b for b, _, _ in EDGES["fmm.jobs.compare"] if b.startswith("fmm.jobs.") and b != "fmm.jobs.compare"]
    assert not others, f"fmm.jobs.compare imports {others}: it reads MLflow only"


def test_imports_sit_at_module_level_outside_the_cli():
    inner = [f"{a} line {line}: {b}" for a, edges in EDGES.items() if a != "fmm.cli"
             for b, line, top in edges if not top]
    assert not inner, "imports inside functions hide the graph: " + "; ".join(inner)


def test_the_checker_sees_a_violation_when_there_is_one():
    """The rules above are not vacuous: the layer of a known module and a known downward edge."""
    assert layer("fmm.flowmap") == 0 and layer("fmm.infra.storage") == 1 and layer("fmm.jobs.study") == 5
    assert ("fmm.jobs.train", True) in {(b, top) for b, _, top in EDGES["fmm.jobs.study"]}
    assert layer("fmm.jobs.train") > layer("fmm.worker.loop")  # an edge worker -> jobs would be reported
