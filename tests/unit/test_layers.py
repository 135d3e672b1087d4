"""The import contract of DESIGN.md: imports point downwards only.

agent -> planner/broker/models; planner -> the torch-free model description and
broker's plan schema; broker -> nothing of ours; models, planner and broker never
touch MQTT or asyncio networking; planner and broker never import torch.
Checked twice: statically over every module's import statements, and at run time
by importing the pure layers in a fresh interpreter and looking at sys.modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "agent": "edgedi.agent",
    "broker": "edgedi.broker",
    "planner": "edgedi.planner",
    "models": "edgedi.models",
}
NETWORK = ("aiomqtt", "paho", "amqtt", "asyncio", "socket")

# For each layer: module prefixes it must never import.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "broker": ("edgedi.agent", "edgedi.planner", "edgedi.models", "torch"),
    "planner": ("edgedi.agent", "torch", *NETWORK),
    "models": ("edgedi.agent", "edgedi.planner", "edgedi.broker", *NETWORK),
}
# Modules of our own that the planner may use (plain data, no torch).
PLANNER_ALLOWED_OURS = (
    "edgedi.planner",
    "edgedi.models.units",
    "edgedi.models.specs",
    "edgedi.models.interior",
    "edgedi.broker.plan",
)
# Modules of the model layer that never import torch: the arithmetic the runtime's event
# loop shares with the in-process reference (reductions, stitching).
TORCH_FREE_MODELS = ("edgedi.models.reduce",)
# The broker's network modules may of course use the network; the schemas may not.
BROKER_NETWORK_MODULES = {"connection", "server"}


def _module_name(path: Path) -> str:
    layer = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / layer).with_suffix("").parts
    parts = [PACKAGES[layer], *rest]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")
                is_package = path.name == "__init__.py"
                base = package[: len(package) - node.level + (1 if is_package else 0)]
                found.append(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.append(node.module)
    return found


def _layer_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_torch_free_model_modules_import_no_torch() -> None:
    files = {_module_name(p): p for p in _layer_files("models")}
    violations = [
        f"{module} imports {name}"
        for module in TORCH_FREE_MODELS
        for name in _imports(files[module])
        if _matches(name, "torch") or (name.startswith("edgedi.") and name not in TORCH_FREE_MODELS)
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_static_imports_point_downwards(layer: str) -> None:
    violations = []
    for path in _layer_files(layer):
        for name in _imports(path):
            forbidden = FORBIDDEN[layer]
            if layer == "broker" and path.stem in BROKER_NETWORK_MODULES:
                forbidden = tuple(p for p in forbidden if p not in NETWORK)
            if any(_matches(name, prefix) for prefix in forbidden):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
            if (
                layer == "planner"
                and name.startswith("edgedi.")
                and not any(_matches(name, allowed) for allowed in PLANNER_ALLOWED_OURS)
            ):
                violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_pure_layers_do_not_load_torch_or_mqtt_at_run_time() -> None:
    pure = [_module_name(p) for layer in ("planner",) for p in _layer_files(layer)]
    pure += ["edgedi.models", "edgedi.models.units", "edgedi.broker.plan"]
    pure += list(TORCH_FREE_MODELS)
    pure = [m for m in pure if not m.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'aiomqtt', 'paho', 'amqtt'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "", f"pure layers loaded: {out.stdout.strip()}"


def _top_level_imports(path: Path) -> list[str]:
    """Imports that run when the module loads: not those inside functions or under
    `if TYPE_CHECKING:` (annotations only), which is how a module may look upwards."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path)
    found: list[str] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = module.split(".")
                    is_package = path.name == "__init__.py"
                    base = package[: len(package) - node.level + (1 if is_package else 0)]
                    prefix = ".".join([*base, node.module] if node.module else base)
                else:
                    prefix = node.module or ""
                # `from package import module` needs the module, not the package's
                # __init__ (parents are imported anyway, first); a name needs `prefix`.
                found.extend(f"{prefix}.{alias.name}|{prefix}" for alias in node.names)
            elif isinstance(node, ast.If):
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    visit(node.orelse)
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def _import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one of our modules (Tarjan)."""
    files = [p for layer in PACKAGES for p in _layer_files(layer)]
    modules = {_module_name(p): p for p in files}

    def resolve(item: str) -> str:
        module, _, fallback = item.partition("|")
        return module if module in modules or not fallback else fallback

    graph = {
        name: sorted(
            {
                target
                for target in map(resolve, _top_level_imports(path))
                if target in modules and target != name
            }
        )
        for name, path in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            connect(name)
    return groups


# Inside the agent: the coordinator orchestrates parts that never look back up at it,
# nor at the agent that owns it (only annotations may, under TYPE_CHECKING).
AGENT_BELOW: dict[str, tuple[str, ...]] = {
    "edgedi.agent.result_checks": ("coordinator", "segments", "job_intake", "runtime"),
    "edgedi.agent.tile_tracker": ("coordinator", "segments", "job_intake", "runtime"),
    "edgedi.agent.job_intake": ("coordinator", "segments", "runtime"),
    "edgedi.agent.segments": ("coordinator", "runtime"),
    "edgedi.agent.transport": ("coordinator", "segments", "worker", "runtime"),
}


def test_the_coordinators_parts_sit_below_it() -> None:
    files = {_module_name(p): p for p in _layer_files("agent")}
    violations = []
    for module, above in AGENT_BELOW.items():
        for item in _top_level_imports(files[module]):
            name, _, package = item.partition("|")
            for target in (name, package):
                if any(_matches(target, f"edgedi.agent.{other}") for other in above):
                    violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(violations)


def test_no_import_cycles_among_our_modules() -> None:
    cycles = _import_cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
