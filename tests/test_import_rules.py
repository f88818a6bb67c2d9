"""docs/architecture.md's import rules, checked on the source: which folder may import which, and which modules stay
importable without ComfyUI (scripts/ read them before the host is imported)."""
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
COMFYUI_FREE = ["engine/edit_settings.py", "engine/door.py", *sorted(str(p.relative_to(REPO)) for p in (REPO / "engine/editors").glob("*.py"))]


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute dotted name within the repo or outside it, level) of every import; relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = path.parent.relative_to(REPO).parts
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                out.append((".".join((*base, *(node.module.split(".") if node.module else ()))), node.level))
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
            (level and name.split(".")[0] in LAYERS and not name.startswith(("engine.editors", "engine.edit_settings",
                                                                              "engine.door", "tokenflow_ops")))]
    assert not seen, f"{relative} imports {seen} at import time"
