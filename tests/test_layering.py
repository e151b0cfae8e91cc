"""The import layering, read from the source (every import statement, at module level or inside a function): code
tools cannot see through the ``bi_compile/passes -> ../passes`` symlink, so this test is what keeps it honest.

    kernels -> ops -> passes -> report_cache, vllm_checks, vllm_compat, model -> backend, vllm_pass, vllm_attention,
            vllm_platform, vllm_moe, vllm_worker
            -> vllm_plugin
            -> bi_compile (the package) -> cli -> bi_compile_cli (the torch-free front end), bi_compile.__main__

A module imports only from its own layer or lower ones, the modules import no cycle, and code outside ``passes/``
imports the passes from the package ``bi_compile.passes``, never from its modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    ("bi_compile.kernels",),
    ("bi_compile.ops",),
    ("bi_compile.passes",),
    ("bi_compile.report_cache", "bi_compile.vllm_checks", "bi_compile.vllm_compat", "bi_compile.model"),
    ("bi_compile.backend", "bi_compile.vllm_pass", "bi_compile.vllm_attention", "bi_compile.vllm_platform",
     "bi_compile.vllm_moe", "bi_compile.vllm_worker"),
    ("bi_compile.vllm_plugin",),
    ("bi_compile",),
    ("bi_compile.cli",),
    ("bi_compile_cli", "bi_compile.__main__"),
)


def source_modules() -> dict[str, Path]:
    """Module name -> file, for the package (its passes from ./passes, where they live) and the front end."""
    files = {"bi_compile_cli": ROOT / "bi_compile_cli.py"}
    for folder, package in ((ROOT / "bi_compile", "bi_compile"), (ROOT / "passes", "bi_compile.passes")):
        for path in folder.rglob("*.py"):
            if "passes" in path.relative_to(folder).parts[:-1]:  # the symlink's view of ./passes
                continue
            parts = (package, *path.relative_to(folder).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from package import module`` counts as the module; a module's
    own ancestor packages, which Python imports before it anyway, do not count)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = {f"{module}.{alias.name}" for alias in node.names} & known.keys()
            found |= submodules or {module}
    ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def layer_of(name: str) -> int:
    matches = [(len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or name.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS")
    return max(matches)[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = source_modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_imports_only_its_own_layer_or_lower(graph):
    upward = [f"{name} (layer {layer_of(name)}) imports {dep} (layer {layer_of(dep)})"
              for name, deps in graph.items() for dep in deps if layer_of(dep) > layer_of(name)]
    assert upward == []


def test_the_modules_import_no_cycle(graph):
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_code_outside_the_passes_imports_the_package_only(graph):
    inside = [f"{name} imports {dep}" for name, deps in graph.items() if not name.startswith("bi_compile.passes")
              for dep in deps if dep.startswith("bi_compile.passes.")]
    assert inside == []


def test_control_an_upward_import_and_a_cycle_are_found(tmp_path):
    """The checks above can fail: a kernel importing a pass, and two modules importing each other."""
    known = {"bi_compile.kernels.k": tmp_path / "k.py", "bi_compile.passes": tmp_path / "__init__.py",
             "bi_compile.ops.a": tmp_path / "a.py", "bi_compile.ops.b": tmp_path / "b.py"}
    known["bi_compile.kernels.k"].write_text("def f():\n    from bi_compile.passes import reports\n")
    known["bi_compile.passes"].write_text("")
    known["bi_compile.ops.a"].write_text("from . import b\n")
    known["bi_compile.ops.b"].write_text("from bi_compile.ops import a\n")
    graph = {name: imports(name, path, known) for name, path in known.items()}
    with pytest.raises(AssertionError):
        test_every_module_imports_only_its_own_layer_or_lower(graph)
    with pytest.raises(AssertionError):
        test_the_modules_import_no_cycle(graph)
