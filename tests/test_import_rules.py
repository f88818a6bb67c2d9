"""docs/architecture.md's import rules, checked on the source: which folder may import which, the order of the
engine's rooms, how deep a room's own imports go, no import circle and no private name taken from another
module, and which modules stay importable without ComfyUI (scripts/ read them before the host is imported)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("tokenflow_ops", "metric", "data", "engine", "nodes")
MAY_IMPORT = {  # a layer's own modules always; the rest as docs/architecture.md's table says
    "tokenflow_ops": set(),
    "metric": set(),
    "data": {"tokenflow_ops"},
    "engine": {"data", "tokenflow_ops"},
    "nodes": {"engine", "data", "tokenflow_ops", "metric"},
}
COMFYUI = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview", "nodes",
           "server", "execution", "node_helpers"}
COMFYUI_ALLOWED = {"tokenflow_ops": set(), "metric": set(), "data": {"comfy_api"}}  # engine, nodes: all of ComfyUI
COMFYUI_FREE = ["engine/plan/settings.py", "engine/plan/__init__.py", "engine/door.py",
                "engine/families/__init__.py", "engine/families/base.py", "engine/families/injection_presets.py",
                *sorted(str(p.relative_to(REPO)) for p in (REPO / "engine/editors").glob("*.py"))]
COMFYUI_FREE_IMPORTS = ("engine.editors", "engine.plan.settings", "engine.door", "tokenflow_ops",
                        "engine.families.base", "engine.families.injection_presets")
# The engine's rooms (docs/architecture.md) and the rooms each may import: one way, bottom to top.
ENGINE_ROOMS = {
    "door": set(),
    "families": set(),
    "editors": {"door", "families"},
    "plan": {"editors", "families"},
    "patches": {"families"},
    "checks": {"editors", "families", "patches", "plan"},
    "sampling": {"checks", "families", "patches", "plan"},
    "ddpm": {"checks", "families", "patches", "plan", "sampling"},
    "flow": {"checks", "families", "patches", "plan", "sampling"},
    "sampling_paths": {"ddpm", "families", "flow"},
}
MAX_ROOM_LEVELS = 4
MAX_LINES = 410
# Everything whose imports must form no circle: the pack's layers, the tools around it.
CIRCLE_FREE = (*LAYERS, "benchmarks", "devkit", "scripts")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(base: str, name: str) -> str:
    """``base.name`` when that is a module of the repo (``from .. import door``), else ``base``."""
    candidate = f"{base}.{name}" if base else name
    path = REPO / candidate.replace(".", "/")
    return candidate if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else base


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute dotted name within the repo or outside it, level) of every import; relative ones resolved, and
    ``from package import module`` resolved to the module."""
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(REPO).parts
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join((*package[:len(package) - node.level + 1], *(node.module.split(".") if node.module else ())))
                out += sorted({(_resolve(base, alias.name), node.level) for alias in node.names})
            else:
                out.append((node.module, 0))
    return out


def _modules(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_what_the_architecture_allows(layer: str):
    problems = []
    for path in _modules(layer):
        for name, level in _imports(path):
            top = name.split(".")[0]
            if level and top != layer and top not in MAY_IMPORT[layer]:
                problems.append(f"{path.relative_to(REPO)} imports {name}")
            if not level and layer in COMFYUI_ALLOWED and top in COMFYUI and top not in COMFYUI_ALLOWED[layer]:
                problems.append(f"{path.relative_to(REPO)} imports ComfyUI's {name}")
    assert not problems


@pytest.mark.parametrize("relative", COMFYUI_FREE)
def test_the_declarations_import_no_comfyui(relative: str):
    """The editors' declarations and the sampler's settings: ComfyUI-free at import time (functions may import it)."""
    seen = [name for name, level in _imports(REPO / relative, top_level_only=True)
            if (not level and name.split(".")[0] in COMFYUI) or
            (level and name.split(".")[0] in LAYERS and not name.startswith(COMFYUI_FREE_IMPORTS))]
    assert not seen, f"{relative} imports {seen} at import time"


def _room(name: str) -> str | None:
    """The engine room of a dotted module name (``engine.patches.dit`` -> ``patches``), None outside engine/."""
    parts = name.split(".")
    return parts[1] if parts[0] == "engine" and len(parts) > 1 else None


def test_the_engine_rooms_import_one_way():
    """Every room imports only the rooms below it (docs/architecture.md), function-level imports included."""
    problems = []
    for path in _modules("engine"):
        own = _room(_module_name(path))
        assert own in ENGINE_ROOMS, f"{path.relative_to(REPO)} is in no room of ENGINE_ROOMS ({own!r})"
        for name, level in _imports(path):
            other = _room(name) if level else None
            if other is not None and other != own and other not in ENGINE_ROOMS[own]:
                problems.append(f"{path.relative_to(REPO)} ({own}) imports {name} ({other})")
    assert not problems


def test_the_room_order_has_no_circle():
    """The allowed imports themselves run one way: no room may import a room that may import it."""
    order: list[str] = []
    pending = dict(ENGINE_ROOMS)
    while pending:
        ready = [room for room, below in pending.items() if below <= set(order)]
        assert ready, f"the rooms {sorted(pending)} import each other"
        order += sorted(ready)
        for room in ready:
            del pending[room]
    assert "flow" not in ENGINE_ROOMS["ddpm"] and "ddpm" not in ENGINE_ROOMS["flow"]


def _graph(folders) -> dict[str, set[str]]:
    """Module -> the repo modules it imports (any level). benchmarks/, devkit/ and scripts/ import their siblings by
    bare name (``import _host``), which is resolved within their folder."""
    modules = {_module_name(p): p for folder in folders for p in _modules(folder) if "door_pack" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported, level in _imports(path):
            if not level and path.parent.name in ("benchmarks", "devkit", "scripts"):
                sibling = f"{path.parent.name}.{imported.split('.')[0]}"
                imported = sibling if sibling in modules else imported.removeprefix("comfyui_tokenflow.")
            elif not level:
                imported = imported.removeprefix("comfyui_tokenflow.")
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_anywhere():
    circles = _circles(_graph(CIRCLE_FREE))
    assert not circles, f"modules that import each other: {circles}"


def test_the_circle_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("room", sorted(room for room in ENGINE_ROOMS if (REPO / "engine" / room).is_dir()))
def test_a_rooms_own_imports_are_at_most_four_levels_deep(room: str):
    """A module that imports nothing of its room stands on level 1; one that imports a level-n module of its
    room on level n + 1."""
    graph = {name: {t for t in targets if _room(t) == room} for name, targets in _graph(("engine",)).items()
             if _room(name) == room}
    levels: dict[str, int] = {}

    def level(name: str) -> int:
        if name not in levels:
            levels[name] = 1 + max((level(t) for t in graph.get(name, ())), default=0)
        return levels[name]

    deepest = max(graph, key=level)
    assert level(deepest) <= MAX_ROOM_LEVELS, f"{deepest} stands on level {level(deepest)} of {room}: {levels}"


def test_no_module_takes_a_private_name_of_another():
    problems = []
    for layer in LAYERS:
        for path in _modules(layer):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    taken = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if taken:
                        problems.append(f"{path.relative_to(REPO)} takes {taken} from {'.' * node.level}{node.module}")
    assert not problems


@pytest.mark.parametrize("layer", LAYERS)
def test_modules_stay_short(layer: str):
    long = {str(p.relative_to(REPO)): n for p in _modules(layer) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
