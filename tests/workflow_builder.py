"""Renders example-workflow specifications (``tests/example_specs.py``) as UI-format JSON and thumbnails.

Every example reads left to right in groups, one per stage: **Load**, **Invert**, **Edit** and
**Output** (``GROUPS``). A node names its group, a sub-column inside it and a band (row);
columns are laid out group after group, bands top to bottom, and each (group, band) gets one
group frame titled with the stage (and the band's title when an example has several rows).

Every example opens at ``READABLE_SCALE`` (saved in ``extra.ds``), above the zoom under which the frontend
draws no text (its default "LiteGraph.Canvas.MinFontSizeForLOD" of 8 px over the 14 px node font: 0.571 at
device pixel ratio 1, on frontends 1.27 and 1.35), with the "Read me" note at the top left of the view, and
every node is wide enough for its title (``title_width``), so the frontend neither cuts a title nor widens the
node past its group.
"""
from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflow_format import FRONTEND_ONLY_NODES, default_value, input_specs, output_types, widget_slots

PACK_CNR_ID = "comfyui-tokenflow"
GROUPS = ("Load", "Invert", "Edit", "Output")  # left to right; "" = outside any group (the note)
GROUP_COLORS = {"Load": "#3f789e", "Invert": "#8a6f3f", "Edit": "#3f8a5b", "Output": "#7a4f8a"}
GAP = 40  # between columns of a group and between stacked nodes
GROUP_GAP = 110  # between groups (their frames take 20 px on each side)
BAND_GAP = 80
GROUP_TITLE = 90  # room above a band's nodes for the group title
TITLE_BAR = 30
# The zoom the examples open at: text is drawn from 8 / 14 = 0.571 on (the frontend's default); at 100% the note's
# text is 10 px high, the smallest that reads, and the notes are sized to fit a 1366x768 window under the
# frontend's bars.
READABLE_SCALE = 1.0
# Screen pixels from the canvas's top left to the note's title bar: frontend 1.35 draws the canvas under its side bar
# (58 px) and its tabs and breadcrumb (95 px); 1.27 starts the canvas right of and below them.
NOTE_VIEW_MARGIN = (80, 110)
# LiteGraph's own estimate of a character of the 14 px node title (0.6 em), and the title bar's room left and
# right of the text (the collapse dot and the margins): the frontend widens a node whose title needs more.
TITLE_CHAR_WIDTH = 8.4
TITLE_PADDING = 50
# Loader node type -> how many of its first widgets name model files (listed in its "models" property).
# Nodes whose only widgets are the frontend's own display widgets (Preview Any's text, and on frontend 1.35 its
# Markdown toggle, saved as [null, null, false]; 1.27 saves []): saved without widgets_values, so that each
# frontend keeps its own defaults.
DISPLAY_ONLY_NODES = {"PreviewAny"}
MODEL_WIDGETS = {"CheckpointLoaderSimple": 1, "ControlNetLoader": 1, "UNETLoader": 1, "DualCLIPLoader": 2,
                 "VAELoader": 1}


@dataclass
class N:
    """One node of an example: id, type, its group, sub-column in the group, band (row), widget values."""

    id: int
    type: str
    group: str
    col: int = 0
    band: int = 0
    widgets: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    size: tuple[int, int] | None = None
    text: str | None = None  # MarkdownNote text


@dataclass
class Example:
    name: str
    nodes: list[N]
    links: list[tuple[int, str | int, int, str]]  # (from id, output name or index, to id, input name)
    bands: list[str] = field(default_factory=lambda: [""])  # suffix of the group titles per band
    titles: dict[tuple[str, int], str] = field(default_factory=dict)  # (group, band) -> title, overriding
    # The template browser lists a pack's examples by file name and thumbnail only, in no set order: the title
    # carries the example's place in the reading order, the caption (one line) what it does and what it needs.
    thumbnail: tuple[str, str] = ("", "")  # title, caption


def group_title(group: str, band_title: str) -> str:
    return f"{group}: {band_title}" if band_title else group


# --------------------------------------------------------------------------------------------
# specification -> UI-format JSON
# --------------------------------------------------------------------------------------------

def title_width(title: str) -> int:
    """The width a node needs for ``title`` uncut (a conservative estimate; the frontend test measures it)."""
    return math.ceil(TITLE_PADDING + TITLE_CHAR_WIDTH * len(title))


def _node_size(node: N, title: str, n_sockets: int, n_outputs: int, n_widgets: int) -> list[int]:
    if node.size:
        return list(node.size)
    if node.type == "CLIPTextEncode":
        width, height = 400, 160
    elif node.type in ("PreviewImage", "SaveVideo"):
        width, height = 340, 480  # room for the image/video preview shown after a run
    elif node.type == "PreviewAny":
        width, height = 320, 160  # the text result (and, on newer frontends, its Markdown toggle)
    else:
        width, height = 320, 30 + 22 * max(n_sockets, n_outputs) + 26 * n_widgets
        if node.type == "TokenFlowLoadVideo":  # the upload widget's video preview, as wide as the frontend makes it
            width, height = 440, height + 400
    return [max(width, title_width(title)), height]


def _ui_node(example: Example, node: N, info: dict | None, incoming: dict, link_rows: list,
             model_links: dict[str, tuple[str, str]]) -> dict:
    if node.type in FRONTEND_ONLY_NODES:
        return {"id": node.id, "type": node.type, "pos": [0, 0], "size": list(node.size or (400, 220)), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": node.title or "Note", "properties": {},
                "widgets_values": [node.text or ""], "color": "#432", "bgcolor": "#653"}
    if info is None:
        raise KeyError(f"{example.name}: node type {node.type} is not in /object_info")
    specs = input_specs(info)
    links_in = incoming.get(node.id, {})
    unknown = (set(node.widgets) - {s.name for s in specs if s.is_widget}) | (set(links_in) - {s.name for s in specs})
    if unknown:
        raise KeyError(f"{example.name}: node {node.id} ({node.type}) has no inputs {sorted(unknown)}")
    inputs = []
    for spec in specs:  # sockets: all non-widget inputs, then the linked widget inputs
        if not spec.is_widget:
            slot = {"name": spec.name, "type": spec.type, "link": links_in.get(spec.name, (None,))[0]}
            if spec.optional:
                slot["shape"] = 7
            inputs.append(slot)
    for spec in specs:
        if spec.is_widget and spec.name in links_in:
            inputs.append({"name": spec.name, "type": spec.type, "widget": {"name": spec.name},
                           "link": links_in[spec.name][0]})
    for index, slot in enumerate(inputs):
        if slot["link"] is not None:
            link_rows[slot["link"] - 1][4] = index
    outputs = []
    for index, (out_type, out_name) in enumerate(zip(output_types(info), info.get("output_name", []))):
        ids = [row[0] for row in link_rows if row[1] == node.id and row[2] == index]
        slot = {"name": out_name, "type": out_type, "links": ids}
        if ids:
            slot["slot_index"] = index
        outputs.append(slot)
    values = []
    for name, kind in widget_slots(info):
        if kind == "upload":
            values.append("image")
        elif kind == "control":
            values.append("fixed")
        else:
            values.append(node.widgets.get(name, default_value(next(s for s in specs if s.name == name))))
    properties: dict[str, Any] = {"Node name for S&R": node.type}
    module = info.get("python_module", "")
    properties["cnr_id"] = "comfy-core" if module == "nodes" or module.startswith("comfy_extras") else PACK_CNR_ID
    files = [v for v in values[:MODEL_WIDGETS.get(node.type, 0)] if v in model_links]
    if files:  # the frontend offers these for download when they are missing
        properties["models"] = [{"name": name, "url": model_links[name][0], "directory": model_links[name][1]}
                                for name in files]
    title = node.title or info.get("display_name") or node.type
    entry = {"id": node.id, "type": node.type, "pos": [0, 0], "size": _node_size(node, title, len(inputs),
                                                                                     len(outputs), len(values)),
             "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs, "properties": properties,
             "widgets_values": values}
    if node.type in DISPLAY_ONLY_NODES and not values:
        del entry["widgets_values"]
    if node.title:
        entry["title"] = node.title
    return entry


def build_ui_workflow(example: Example, object_info: dict, model_links: dict[str, tuple[str, str]]) -> dict:
    """The UI-format workflow; ``model_links``: model file name -> (download URL, models folder), shown by the
    frontend when the file is missing."""
    infos = {n.id: object_info.get(n.type) for n in example.nodes}
    incoming: dict[int, dict[str, tuple[int, int, int]]] = {}
    link_rows = []
    for link_id, (src, out, dst, in_name) in enumerate(example.links, start=1):
        names = infos[src].get("output_name", [])
        out_index = out if isinstance(out, int) else names.index(out)
        link_rows.append([link_id, src, out_index, dst, None, output_types(infos[src])[out_index]])
        incoming.setdefault(dst, {})[in_name] = (link_id, src, out_index)
    ui_nodes = [_ui_node(example, node, infos[node.id], incoming, link_rows, model_links) for node in example.nodes]
    _layout(example, ui_nodes)
    _execution_order(ui_nodes, link_rows)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-tokenflow/{example.name}")),
        "revision": 0,
        "last_node_id": max(n.id for n in example.nodes),
        "last_link_id": len(link_rows),
        "nodes": ui_nodes,
        "links": link_rows,
        "groups": _groups(example, ui_nodes),
        "config": {},
        "extra": {"ds": _opening_view(example, ui_nodes)},
        "version": 0.4,
    }


def _column_key(node: N) -> tuple[int, int]:
    return (GROUPS.index(node.group) + 1 if node.group else 0, node.col)


def _layout(example: Example, ui_nodes: list[dict]) -> None:
    """Columns: groups left to right, sub-columns inside; bands top to bottom; nodes stacked in a column."""
    spec = {n.id: n for n in example.nodes}
    columns = sorted({_column_key(n) for n in example.nodes})
    x_of, x = {}, 0
    for i, column in enumerate(columns):
        if i and column[0] != columns[i - 1][0]:
            x += GROUP_GAP - GAP
        x_of[column] = x
        x += max(ui["size"][0] for ui in ui_nodes if _column_key(spec[ui["id"]]) == column) + GAP
    y = 0
    for band in sorted({n.band for n in example.nodes}):
        top, bottom = y + GROUP_TITLE, y + GROUP_TITLE
        for column in columns:
            yy = top
            for ui in ui_nodes:
                if _column_key(spec[ui["id"]]) == column and spec[ui["id"]].band == band:
                    ui["pos"] = [x_of[column], yy]
                    yy += ui["size"][1] + GAP + TITLE_BAR
            bottom = max(bottom, yy)
        y = bottom + BAND_GAP


def _opening_view(example: Example, ui_nodes: list[dict]) -> dict:
    """The saved view: ``READABLE_SCALE``, the "Read me" note's title bar ``NOTE_VIEW_MARGIN`` from the canvas's top
    left (the graph starts right of it); screen = (graph + offset) * scale."""
    notes = [ui for ui in ui_nodes if ui["type"] in FRONTEND_ONLY_NODES]
    left = min(ui["pos"][0] for ui in (notes or ui_nodes))
    top = min(ui["pos"][1] for ui in (notes or ui_nodes)) - TITLE_BAR
    return {"scale": READABLE_SCALE, "offset": [round(NOTE_VIEW_MARGIN[0] / READABLE_SCALE - left, 2),
                                                round(NOTE_VIEW_MARGIN[1] / READABLE_SCALE - top, 2)]}


def _execution_order(ui_nodes: list[dict], link_rows: list[list]) -> None:
    deps = {n["id"]: {row[1] for row in link_rows if row[3] == n["id"]} for n in ui_nodes}
    order, done = [], set()
    while len(order) < len(ui_nodes):
        ready = sorted(i for i in deps if i not in done and deps[i] <= done)
        if not ready:
            raise ValueError("the example graph has a cycle")
        order += ready
        done |= set(ready)
    rank = {node_id: i for i, node_id in enumerate(order)}
    for n in ui_nodes:
        n["order"] = rank[n["id"]]


def _groups(example: Example, ui_nodes: list[dict]) -> list[dict]:
    """One group per (stage, band), framing its nodes (title bars included)."""
    spec = {n.id: n for n in example.nodes}
    groups = []
    for band, band_title in enumerate(example.bands):
        for group in GROUPS:
            members = [ui for ui in ui_nodes if spec[ui["id"]].group == group and spec[ui["id"]].band == band]
            if not members:
                continue
            x0 = min(m["pos"][0] for m in members) - 20
            y0 = min(m["pos"][1] for m in members) - TITLE_BAR - 50
            x1 = max(m["pos"][0] + m["size"][0] for m in members) + 20
            y1 = max(m["pos"][1] + m["size"][1] for m in members) + 20
            title = example.titles.get((group, band), group_title(group, band_title))
            groups.append({"id": len(groups) + 1, "title": title,
                           "bounding": [x0, y0, x1 - x0, y1 - y0], "color": GROUP_COLORS[group], "font_size": 24,
                           "flags": {}})
    return groups


def write_thumbnail(path: Path, title: str, subtitle: str, video: str | None, kind: str = "") -> None:
    """A 512x384 JPEG: a frame of the SOURCE clip (or a neutral card), captioned as the source on the image, with the
    title and a one-line caption (``subtitle``) below. No edited frame: without real model weights none can be made
    honestly, so the picture says what it is."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    width, height = 512, 384
    canvas = Image.new("RGB", (width, height), (28, 30, 36))
    frame = None
    if video and os.path.exists(video):
        import av

        with av.open(video) as container:
            for i, f in enumerate(container.decode(video=0)):
                if i == 10:
                    frame = f.to_image().convert("RGB")
                    break
    if frame is not None:
        if kind == "controlnet":
            import cv2

            edges = cv2.Canny(np.asarray(frame.convert("L")), 80, 160)
            half = frame.resize((256, 256))
            canvas.paste(half, (0, 24))
            canvas.paste(Image.fromarray(edges).convert("RGB").resize((256, 256)), (256, 24))
        elif kind == "baselines":
            third = frame.resize((170, 170))
            for i, tint in enumerate(((1.0, 1.0, 1.0), (1.15, 0.9, 0.85), (0.85, 0.95, 1.15))):
                arr = np.clip(np.asarray(third, dtype=np.float32) * np.array(tint), 0, 255).astype(np.uint8)
                canvas.paste(Image.fromarray(arr), (1 + i * 171, 80))
        elif kind == "sdedit":  # the source, then partly noised (where SDEdit starts from)
            arr = np.asarray(frame.resize((384, 384)), dtype=np.float32)
            noise = np.random.default_rng(0).normal(127.0, 70.0, arr.shape)
            arr[:, 192:] = 0.55 * arr[:, 192:] + 0.45 * noise[:, 192:]
            canvas.paste(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), (64, 0))
        else:
            canvas.paste(frame.resize((384, 384)), (64, 0))
    draw = ImageDraw.Draw(canvas)
    if frame is not None:  # what the picture shows: the input, not what the workflow produces
        caption = {"controlnet": "source frame | its canny edges (the hint)",
                   "sdedit": "source frame | partly noised (where SDEdit starts)",
                   "baselines": "source frame, tinted (illustration only)"}.get(kind, "source frame (the input)")
        caption_font = ImageFont.load_default(size=18)
        box = draw.textbbox((0, 0), caption, font=caption_font)
        draw.rectangle([(0, 0), (box[2] + 16, box[3] + 12)], fill=(14, 16, 22))
        draw.text((8, 5), caption, fill=(255, 214, 90), font=caption_font)
    draw.rectangle([(0, height - 96), (width, height)], fill=(14, 16, 22))
    margin = 18
    draw.text((margin, height - 88), title, fill=(255, 255, 255), font=_font_fitting(draw, title, 32, width - 2 * margin))
    draw.text((margin, height - 44), subtitle, fill=(190, 200, 215),
              font=_font_fitting(draw, subtitle, 20, width - 2 * margin))
    canvas.save(path, "JPEG", quality=85, optimize=True)


THUMBNAIL_MIN_FONT = 16  # smaller is unreadable once the template browser shrinks the thumbnail


def _font_fitting(draw: Any, text: str, size: int, room: int) -> Any:
    """The default font at the largest size up to ``size`` that draws ``text`` on one line within ``room`` pixels."""
    from PIL import ImageFont

    for points in range(size, THUMBNAIL_MIN_FONT - 1, -1):
        font = ImageFont.load_default(size=points)
        if draw.textlength(text, font=font) <= room:
            return font
    raise ValueError(f"thumbnail text {text!r} does not fit one line of {room} px at {THUMBNAIL_MIN_FONT} pt: shorten it")
