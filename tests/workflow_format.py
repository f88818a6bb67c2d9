"""UI-format workflows and API-format prompts against a server's ``/object_info``.

* :func:`ui_to_api` turns a UI-format workflow (what the frontend saves: nodes, links,
  ``widgets_values``) into an API-format prompt, mapping ``widgets_values`` to input names with the
  widget order the frontend uses (``/object_info`` ``input_order``: required then optional inputs;
  a ``control_after_generate`` value after seed-like INTs; the upload button's value after all
  inputs of nodes with an upload combo).
* :func:`check_ui_workflow` / :func:`validate_api_prompt` check a workflow against ``/object_info``
  (node types, link types, input names, widget counts, numbers in range, combo values).
* :func:`input_specs`, :func:`widget_slots`, :func:`default_value`, :func:`output_types`: the
  ``/object_info`` helpers ``tests/workflow_builder.py`` renders the shipped examples with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # virtual nodes: never sent to the server


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # "INT", "COMBO", "MODEL", ...
    options: dict
    optional: bool
    choices: tuple = ()

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_control(self) -> bool:
        control = self.options.get("control_after_generate")
        if control is None:
            return self.type == "INT" and self.name in ("seed", "noise_seed")
        return bool(control)


def input_specs(node_info: dict) -> list[InputSpec]:
    """Required then optional inputs, each in ``input_order`` (the frontend's widget order)."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {cat: list(inputs.get(cat, {})) for cat in ("required", "optional")}
    specs = []
    for category in ("required", "optional"):
        declared = inputs.get(category, {})
        for name in order.get(category, []):
            if name not in declared:
                continue
            raw = declared[name]
            options = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
            if isinstance(raw[0], list):
                specs.append(InputSpec(name, "COMBO", options, category == "optional", tuple(raw[0])))
            else:
                choices = tuple(options.get("options", ())) if raw[0] == "COMBO" else ()
                specs.append(InputSpec(name, raw[0], options, category == "optional", choices))
    return specs


def has_upload_widget(node_info: dict) -> bool:
    return any(s.type == "COMBO" and not s.optional and any(s.options.get(f) for f in UPLOAD_FLAGS)
               for s in input_specs(node_info))


def widget_slots(node_info: dict) -> list[tuple[str | None, str]]:
    """The serialised widgets of a node, in order: (input name, "value" | "control") and (None, "upload")."""
    slots: list[tuple[str | None, str]] = []
    for spec in input_specs(node_info):
        if spec.is_widget:
            slots.append((spec.name, "value"))
            if spec.has_control:
                slots.append((spec.name, "control"))
    if has_upload_widget(node_info):
        slots.append((None, "upload"))
    return slots


def default_value(spec: InputSpec) -> Any:
    if "default" in spec.options:
        return spec.options["default"]
    if spec.type == "COMBO":
        return spec.choices[0] if spec.choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec.type)


def output_types(node_info: dict) -> list[str]:
    return [t if isinstance(t, str) else "COMBO" for t in node_info.get("output", [])]


def types_compatible(out_type: str, in_type: str) -> bool:
    if "*" in (out_type, in_type):
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt, and checks
# --------------------------------------------------------------------------------------------

def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow (frontend-only nodes and muted nodes dropped)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        node_type = node["type"]
        if node_type in FRONTEND_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        if node_type not in object_info:
            raise KeyError(f"node {node['id']}: type {node_type!r} is not known to the server")
        info = object_info[node_type]
        specs = {s.name: s for s in input_specs(info)}
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in specs and specs[k].is_widget})
        else:
            for (name, kind), value in zip(widget_slots(info), values):
                if kind == "value" and name is not None:
                    inputs[name] = value
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            link = links[link_id]
            inputs[slot["name"]] = [str(link[1]), int(link[2])]
        entry = {"class_type": node_type, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def check_ui_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems that would stop the frontend from loading ``workflow`` as intended (empty: none)."""
    problems: list[str] = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    if len(nodes) != len(workflow.get("nodes", [])):
        problems.append("duplicate node ids")
    for key in ("last_node_id", "last_link_id", "links", "nodes", "version"):
        if key not in workflow:
            problems.append(f"missing top-level key {key!r}")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is smaller than a node id")
    links = {}
    for link in workflow.get("links", []):
        if len(link) != 6:
            problems.append(f"link {link} is not [id, origin, origin_slot, target, target_slot, type]")
            continue
        link_id, origin, origin_slot, target, target_slot, link_type = link
        links[link_id] = link
        if origin not in nodes or target not in nodes:
            problems.append(f"link {link_id} joins unknown nodes {origin} -> {target}")
            continue
        outs = nodes[origin].get("outputs", [])
        ins = nodes[target].get("inputs", [])
        if origin_slot >= len(outs) or link_id not in (outs[origin_slot].get("links") or []):
            problems.append(f"link {link_id} is not listed on output {origin_slot} of node {origin}")
        elif outs[origin_slot]["type"] != link_type:
            problems.append(f"link {link_id} type {link_type} != output type {outs[origin_slot]['type']}")
        if target_slot >= len(ins) or ins[target_slot].get("link") != link_id:
            problems.append(f"link {link_id} is not the link of input {target_slot} of node {target}")
        elif not types_compatible(link_type, ins[target_slot]["type"]):
            problems.append(f"link {link_id} type {link_type} does not fit input {ins[target_slot]['name']} "
                            f"({ins[target_slot]['type']}) of node {target}")
    if workflow.get("links") and workflow.get("last_link_id", 0) < max(links, default=0):
        problems.append("last_link_id is smaller than a link id")
    for node_id, node in nodes.items():
        node_type = node.get("type")
        where = f"node {node_id} ({node_type})"
        if node_type in FRONTEND_ONLY_NODES:
            continue
        if node_type not in object_info:
            problems.append(f"{where}: unknown node type")
            continue
        info = object_info[node_type]
        specs = {s.name: s for s in input_specs(info)}
        for slot in node.get("inputs", []):
            spec = specs.get(slot["name"])
            if spec is None:
                problems.append(f"{where}: input {slot['name']!r} does not exist")
            elif spec.is_widget and "widget" not in slot:
                problems.append(f"{where}: widget input {slot['name']!r} listed without its 'widget' entry")
            elif not types_compatible(slot["type"], spec.type):
                problems.append(f"{where}: input {slot['name']!r} has type {slot['type']}, server says {spec.type}")
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        for spec in specs.values():
            if not spec.optional and not spec.is_widget and spec.name not in linked:
                problems.append(f"{where}: required input {spec.name!r} is not connected")
        outs = output_types(info)
        if [o["type"] for o in node.get("outputs", [])] != outs:
            problems.append(f"{where}: outputs {[o['type'] for o in node.get('outputs', [])]} != server's {outs}")
        values = node.get("widgets_values", [])
        slots = widget_slots(info)
        if isinstance(values, list) and len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widgets_values for {len(slots)} widgets "
                            f"{[n or kind for n, kind in slots]}")
    return problems


def validate_api_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Node types, input names, connections and widget values (type, range, choice) per /object_info."""
    problems: list[str] = []
    for node_id, node in prompt.items():
        node_type = node.get("class_type")
        where = f"node {node_id} ({node_type})"
        if node_type not in object_info:
            problems.append(f"{where}: unknown node type")
            continue
        specs = {s.name: s for s in input_specs(object_info[node_type])}
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                problems.append(f"{where}: unknown input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{where}: input {name!r} links to missing node {value[0]}")
                    continue
                outs = output_types(object_info.get(source["class_type"], {}))
                if value[1] >= len(outs):
                    problems.append(f"{where}: input {name!r} links to missing output {value[1]} of node {value[0]}")
                elif not types_compatible(outs[value[1]], spec.type):
                    problems.append(f"{where}: input {name!r} ({spec.type}) linked to a {outs[value[1]]} output")
                continue
            if not spec.is_widget:
                problems.append(f"{where}: {spec.type} input {name!r} needs a connection, got {value!r}")
                continue
            problems += [f"{where}: {p}" for p in _value_problems(spec, value)]
        for spec in specs.values():
            if not spec.optional and spec.name not in node["inputs"]:
                problems.append(f"{where}: required input {spec.name!r} missing")
    return problems


def _value_problems(spec: InputSpec, value: Any) -> list[str]:
    if spec.type == "COMBO":
        return [] if value in spec.choices else [f"{spec.name}={value!r} is not one of {list(spec.choices)[:12]}"]
    if spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{spec.name}={value!r} is not a boolean"]
    if spec.type == "STRING":
        return [] if isinstance(value, str) else [f"{spec.name}={value!r} is not a string"]
    if spec.type == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return [f"{spec.name}={value!r} is not an integer"]
    if spec.type == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
        return [f"{spec.name}={value!r} is not a number"]
    problems = []
    if "min" in spec.options and value < spec.options["min"]:
        problems.append(f"{spec.name}={value} < min {spec.options['min']}")
    if "max" in spec.options and value > spec.options["max"]:
        problems.append(f"{spec.name}={value} > max {spec.options['max']}")
    return problems
