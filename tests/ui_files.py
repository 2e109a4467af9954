"""Writing the editor's (UI) format from API workflows, as ComfyUI's editor saves it: nodes with
positional widgets_values (a control_after_generate value after each seed, the upload button's
value after LoadImage's widgets), typed input/output slots and a link table; plus the editor's
own nodes (Reroute, PrimitiveNode, Note) and bypassed / muted nodes spliced in."""
from __future__ import annotations

import copy

from kiln.nodes import registry


class UiWorkflow:
    def __init__(self, api: dict):
        self.nodes: dict[int, dict] = {}
        self.links: list[list] = []
        for node_id, entry in api.items():
            definition = registry.get(entry["class_type"])
            widgets, inputs = [], []
            for spec in definition.inputs:
                value = entry["inputs"].get(spec.name, spec.default)
                if spec.is_widget:
                    linked = isinstance(value, list)
                    widgets.append(spec.default if linked else value)
                    if spec.name == definition.seed:
                        widgets.append("randomize")
                    if linked:
                        inputs.append({"name": spec.name, "type": spec.type, "link": None,
                                       "widget": {"name": spec.name}})
                elif spec.name in entry["inputs"] or not spec.optional:
                    inputs.append({"name": spec.name, "type": spec.type, "link": None})
            if any(spec.folder == "input" for spec in definition.inputs):
                widgets.append("image")   # the upload button
            node = {"id": int(node_id), "type": entry["class_type"], "mode": 0, "inputs": inputs,
                    "outputs": [{"name": t, "type": t, "links": []} for t in definition.outputs],
                    "widgets_values": widgets, "properties": {}}
            if "_meta" in entry:
                node["title"] = entry["_meta"]["title"]
            self.nodes[int(node_id)] = node
        for node_id, entry in api.items():
            for name, value in entry["inputs"].items():
                if isinstance(value, list):
                    self.connect(int(value[0]), value[1], int(node_id), name)

    def _slot(self, node_id: int, name: str) -> int:
        return next(i for i, e in enumerate(self.nodes[node_id]["inputs"]) if e["name"] == name)

    def connect(self, origin: int, slot: int, target: int, input_name: str) -> None:
        link_id = max((link[0] for link in self.links), default=0) + 1
        target_slot = self._slot(target, input_name)
        kind = self.nodes[origin]["outputs"][slot]["type"] if self.nodes[origin]["outputs"] else "*"
        self.links.append([link_id, origin, slot, target, target_slot, kind])
        self.nodes[target]["inputs"][target_slot]["link"] = link_id
        self.nodes[origin]["outputs"][slot]["links"].append(link_id)

    def _source(self, target: int, input_name: str) -> tuple[int, int]:
        link_id = self.nodes[target]["inputs"][self._slot(target, input_name)]["link"]
        link = next(link for link in self.links if link[0] == link_id)
        self.links.remove(link)
        return link[1], link[2]

    def add(self, node_id: int, kind: str, inputs: list[dict], outputs: list[str], widgets=None, mode=0) -> None:
        self.nodes[node_id] = {"id": node_id, "type": kind, "mode": mode, "inputs": inputs,
                               "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
                               "widgets_values": widgets or [], "properties": {}}

    def reroute(self, node_id: int, target: int, input_name: str) -> None:
        """A Reroute on the link into ``target.input_name``."""
        origin, slot = self._source(target, input_name)
        kind = self.nodes[origin]["outputs"][slot]["type"]
        self.add(node_id, "Reroute", [{"name": "", "type": "*", "link": None}], [kind])
        self.nodes[node_id]["inputs"][0]["name"] = "input"
        self.connect(origin, slot, node_id, "input")
        self.connect(node_id, 0, target, input_name)

    def primitive(self, node_id: int, target: int, widget: str, value) -> None:
        """A PrimitiveNode driving ``target``'s widget (converted to an input)."""
        entry = {"name": widget, "type": "INT", "link": None, "widget": {"name": widget}}
        self.nodes[target]["inputs"].append(entry)
        self.add(node_id, "PrimitiveNode", [], ["INT"], widgets=[value, "fixed"])
        self.connect(node_id, 0, target, widget)

    def bypassed(self, node_id: int, kind: str, target: int, input_name: str, widgets: list) -> None:
        """A bypassed node of ``kind`` (one input and output of the link's type) on that link."""
        origin, slot = self._source(target, input_name)
        socket = self.nodes[origin]["outputs"][slot]["type"]
        name = next(s.name for s in registry.get(kind).inputs if s.type == socket)
        self.add(node_id, kind, [{"name": name, "type": socket, "link": None}], [socket], widgets=widgets, mode=4)
        self.connect(origin, slot, node_id, name)
        self.connect(node_id, 0, target, input_name)

    def data(self) -> dict:
        last_link = max((link[0] for link in self.links), default=0)
        return copy.deepcopy({"last_node_id": max(self.nodes), "last_link_id": last_link,
                              "nodes": list(self.nodes.values()), "links": self.links, "groups": [],
                              "config": {}, "extra": {}, "version": 0.4})
