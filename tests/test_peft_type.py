"""The "GRIN" PEFT type lives in a module of its own, so config and registration are in no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from peft.utils.peft_types import PeftType

import grin_peft
from grin_peft import peft_type, registration

PACKAGE = Path(grin_peft.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """grin_peft modules ``path`` imports anywhere, deferred (function-level) imports included: a deferred import
    still makes the modules depend on each other, it only hides the cycle until run time."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.update({target} if node.module else set())
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                connect(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = set()
            while not component or node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                out.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_config_and_registration_are_in_no_import_cycle():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: (_imports(path, name) & set(modules)) - {name} for name, path in modules.items()}
    assert (
        "grin_peft.peft_type" in graph["grin_peft.config"]
        and "grin_peft.registration" not in graph["grin_peft.config"]
    )
    named = {"grin_peft.config", "grin_peft.registration", "grin_peft.hub", "grin_peft.peft_type"}
    assert [cycle for cycle in _cycles(graph) if cycle & named] == []


def test_the_peft_type_is_one_enum_member_shared_by_everyone():
    assert registration.GRIN_PEFT_TYPE is peft_type.GRIN_PEFT_TYPE is grin_peft.GRIN_PEFT_TYPE is PeftType("GRIN")
