"""The layers import downwards only, and nothing imports in a circle.

core `ftd/` (config, store, tracking, errors, orchestration) < stages and backends `tasks/` < the flows
`flows/` (wiring, pre-flight, registration, report, run records) < entry points `app/` (the CLI).
A backend package imports the contract (`tasks.backends.base`, `registry`, `runtime`) and the shared
stages, never another backend. Imports inside functions count too: deferring one does not make
an upward dependency acceptable, and a cycle that only a deferred import breaks is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"ftd": 0, "tasks": 1, "flows": 2, "app": 3}
CONTRACT = {"base", "registry", "runtime", "shape"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (resolved to the longest known prefix)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # annotations only: not imported at run time
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            parts = target.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in modules:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_no_upward_import() -> None:
    upward = [f"{m} imports {i}" for m, deps in graph().items() for i in deps if layer(i) > layer(m)]
    assert not upward, "\n".join(sorted(upward))


def test_backends_import_only_the_contract_never_each_other() -> None:
    def backend_of(module: str) -> str | None:
        parts = module.split(".")
        if parts[:2] == ["tasks", "backends"] and len(parts) > 2 and parts[2] not in CONTRACT:
            return parts[2]
        return None

    crossing = [f"{m} imports {i}" for m, deps in graph().items() for i in deps
                if backend_of(m) and backend_of(i) and backend_of(i) != backend_of(m)]  # fmt: skip
    shared = [f"{m} imports {i}" for m, deps in graph().items() for i in deps
              if backend_of(i) and not backend_of(m) and m != "tasks.backends.registry"]  # fmt: skip
    assert not crossing, "\n".join(sorted(crossing))
    assert not shared, "only the registry names backend packages:\n" + "\n".join(sorted(shared))


def test_no_import_cycle() -> None:
    deps = graph()
    # packages import their __init__ implicitly; an edge to a package is an edge to its __init__ only
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(deps.get(module, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_flow_is_wiring_and_names_no_backend() -> None:
    from tasks.backends.registry import BUILTIN

    text = (ROOT / "flows" / "finetune_to_deploy.py").read_text()
    assert len(text.splitlines()) <= 130
    named = [name for name in BUILTIN if name in text]
    assert not named, f"the flow names backends {named}"
