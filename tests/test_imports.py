"""Import hygiene: no import cycles inside medtricks, and `import medtricks` / the CLI stay light (no torch)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_TIME = re.compile(r"import time:\s+\d+ \|\s+\d+ \| (.+)$")  # -X importtime: self [us] | cumulative | module

# What `import medtricks.cli` must not pull in: the command bodies import these when they run.
HEAVY_PACKAGES = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "monai")
HEAVY_MEDTRICKS = ("medtricks.attacks", "medtricks.robustness", "medtricks.ablate", "medtricks.compare",
                   "medtricks.plots", "medtricks.metrics", "medtricks.finetune", "medtricks.train")


def module_name(path: Path, package: Path) -> str:
    """`pkg/x/__init__.py` -> `pkg.x`, `pkg/x/y.py` -> `pkg.x.y`."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path) -> dict[str, dict[str, str]]:
    """Module -> {imported module of the same package: where (file:line)}, from every import statement anywhere in
    the file (module level, functions, `if TYPE_CHECKING:`). No implicit edge to a parent package; no self-edges."""
    top = package.name

    def is_module(name: str) -> bool:
        path = package.parent.joinpath(*name.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()

    graph: dict[str, dict[str, str]] = {}
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    parts = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                # `from base import y` imports the module base.y when there is one, else takes y from base
                targets = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if (target == top or target.startswith(top + ".")) and target != name:
                    edges.setdefault(target, f"{path.relative_to(package.parent)}:{node.lineno}")
    return graph


def find_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every elementary cycle, each as [a, b, ..., a] starting at its smallest module, sorted."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), {}):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    cycles: list[list[str]] = []

    def walk(start: str, path: list[str], component: set[str]) -> None:
        for nxt in sorted(graph.get(path[-1], {})):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt > start and nxt in component and nxt not in path:
                walk(start, [*path, nxt], component)

    for start in sorted(graph):  # only walk the strongly connected component of start: no blow-up on a DAG
        walk(start, [start], {node for node in reach[start] if start in reach.get(node, set())})
    return cycles


def describe(cycles: list[list[str]], graph: dict[str, dict[str, str]]) -> str:
    edges = sorted({(a, b) for cycle in cycles for a, b in pairwise(cycle)})
    return "\n".join([" -> ".join(cycle) for cycle in cycles] + ["edges:"]
                     + [f"  {a} -> {b}  ({graph[a][b]})" for a, b in edges])


def test_no_import_cycle_in_the_package():
    """A cycle (even through a function-level import) makes import order matter and blocks a lazy package."""
    graph = import_graph(ROOT / "medtricks")
    assert "medtricks.cli" in graph and "medtricks.models.backbones" in graph
    cycles = find_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) in medtricks:\n{describe(cycles, graph)}"


TOY = {
    "toy/__init__.py": "from toy.a import f\nimport os\n",
    "toy/a.py": "from toy import b\n\ndef f():\n    pass\n",
    "toy/b.py": "def g():\n    from .sub.c import h\n",
    "toy/sub/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.sub import c\n",
    "toy/sub/c.py": "from .. import errors\nfrom ..errors import E\nimport toy.sub\n\ndef h():\n    pass\n",
    "toy/errors.py": "class E(Exception):\n    pass\n",
}


@pytest.mark.parametrize("with_cycle", [False, True])
def test_cycle_finder_on_a_toy_package(tmp_path, with_cycle):
    """The detector itself: relative, function-level and TYPE_CHECKING imports; `from pkg import submodule`."""
    files = dict(TOY)
    if with_cycle:
        files["toy/errors.py"] += "\n\ndef late():\n    import toy.a\n"
    else:
        files["toy/sub/__init__.py"] = ""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path / "toy")
    expected = {"toy": {"toy.a"}, "toy.a": {"toy.b"}, "toy.b": {"toy.sub.c"}, "toy.sub.c": {"toy.errors", "toy.sub"},
                "toy.errors": {"toy.a"} if with_cycle else set(), "toy.sub": {"toy.sub.c"} if with_cycle else set()}
    assert {name: set(edges) for name, edges in graph.items()} == expected
    assert graph["toy.b"]["toy.sub.c"] == "toy/b.py:2"
    cycles = find_cycles(graph)
    if with_cycle:
        assert cycles == [["toy.a", "toy.b", "toy.sub.c", "toy.errors", "toy.a"], ["toy.sub", "toy.sub.c", "toy.sub"]]
        assert "toy.a -> toy.b -> toy.sub.c -> toy.errors -> toy.a" in describe(cycles, graph)
    else:
        assert cycles == []


def imported_modules(code: str) -> list[str]:
    """The modules a fresh interpreter imports to run `code` (from the repo root, so this checkout is imported)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    modules = [m.group(1).strip() for m in map(IMPORT_TIME.match, out.stderr.splitlines()) if m]
    assert "medtricks" in modules  # the parse works (and python did not find medtricks in sys.modules already)
    return modules


def test_cli_import_stays_light():
    """`medtricks --help` and friends must not pay for torch & co: the CLI imports them inside the commands."""
    modules = imported_modules("import medtricks.cli")
    heavy = sorted({m.split(".")[0] for m in modules if m.split(".")[0] in HEAVY_PACKAGES})
    heavy += [m for m in HEAVY_MEDTRICKS if m in modules]
    assert not heavy, f"`import medtricks.cli` imports {heavy}"


def test_import_medtricks_is_lazy():
    """`import medtricks` imports no torch; the notebook API is still there on first use (PEP 562)."""
    script = """
        import sys, types
        import medtricks
        assert "torch" not in sys.modules, "import medtricks imports torch"
        missing = sorted(set(medtricks.__all__) - set(dir(medtricks)))
        assert not missing, f"dir(medtricks) lacks {missing}"
        assert "torch" not in sys.modules, "dir(medtricks) imports torch"
        medtricks.finetune, medtricks.attack, medtricks.evaluate, medtricks.AttackSettings
        assert isinstance(medtricks.__version__, str)
        for name in sorted(set(medtricks.__all__) - {"__version__"}):  # every public name resolves, to no module
            value = getattr(medtricks, name)
            assert callable(value) and not isinstance(value, types.ModuleType), f"medtricks.{name} is {value!r}"
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_public_functions_are_not_shadowed_by_submodules():
    """Importing the submodule medtricks.finetune sets the package attribute `finetune` to the module; a lazy
    __init__ must still give the function (after `medtricks.evaluate`, which lives there, or a user's import)."""
    script = """
        import types
        import medtricks
        medtricks.evaluate, medtricks.predict  # defined in medtricks.finetune: a lazy lookup imports it
        from medtricks.ablate import ablate
        from medtricks.compare import compare
        from medtricks.finetune import finetune
        for name, function in {"finetune": finetune, "ablate": ablate, "compare": compare}.items():
            value = getattr(medtricks, name)
            assert not isinstance(value, types.ModuleType) and value is function, f"medtricks.{name} is {value!r}"
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.slow
def test_startup_benchmark_prints_json():
    """Smoke run of benchmarks/startup.py: it runs and prints the JSON with its timings and ratios."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--repeats", "1"],
                         capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(out.stdout)
    assert set(report["commands"]) == {"import_torch", "help", "recipes_list"}
    for result in report["commands"].values():
        assert len(result["seconds"]) == 1 and 0 < result["min"] <= result["median"]
    for key in ("help_vs_import_torch", "recipes_list_vs_import_torch"):
        assert isinstance(report["ratios"][key], float) and report["ratios"][key] > 0
    assert set(report["heavy_imports"]) == {"import medtricks.cli", "help", "recipes_list"}
    assert len(report["machine"]["loadavg_before"]) == 3 and report["machine"]["cpus"] > 0
