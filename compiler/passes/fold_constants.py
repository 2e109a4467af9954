"""Constant folding: evaluate at compile time everything that does not depend on a runtime input."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.graph import Link
from kiln.compiler.interpreter import run_graph
from kiln.compiler.stages import MODEL_TYPES, Binding, Compilation, EnvValue, flatten
from kiln.nodes import registry
from kiln.nodes.registry import NodeDef, RunContext
from kiln.runtime import env


def fold_constants(c: Compilation) -> Compilation:
    """Split the graph into compile time and run time, and evaluate the compile-time side.

    A node runs at run time when it has a runtime input, is not foldable (samplers, savers), or
    reads a run-time node -- except a ``bind`` node that reads run-time values only through its
    image sockets: it is evaluated at compile time with the workflow's images, like a folded
    node, and ``bindings`` say which of the buffers it built the run-time images replace. Of
    the others, data nodes (CONDITIONING, LATENT, IMAGE, MASK) are folded; model nodes
    (``MODEL_TYPES``) are evaluated for their modules
    but are never constants. Guarantees: ``runtime_nodes`` lists the run-time nodes in
    execution order; every folded output a run-time node reads is in ``values`` with its
    tensors in ``constants`` as ``const.<node>.<slot>.<field>`` (CPU copies); every model
    output a run-time node or a bind node reads has its handle in ``handles``; ``folded_clips`` pairs each folded
    node that read a CLIP with it (a LoRA applied at load cannot reach those); ``dropped_models`` names the
    model parts (file and output type) only folded nodes used, which the plan leaves out.
    """
    graph = c.graph
    order = graph.topological_order()
    defs = {node_id: registry.get(graph.nodes[node_id].class_type) for node_id in order}
    with_inputs = {i.node_id for i in c.inputs}
    runtime: list[str] = []
    bind: list[str] = []
    for node_id in order:
        reads_runtime = [name for name, link in graph.nodes[node_id].links() if link.node_id in runtime]
        if node_id in with_inputs or not defs[node_id].foldable:
            runtime.append(node_id)
        elif reads_runtime:
            spec = defs[node_id].plan
            binds = spec is not None and spec.kind == "bind" and set(reads_runtime) <= set(spec.sockets)
            (bind if binds else runtime).append(node_id)
    models = {node_id for node_id in order if _is_model(defs[node_id])}
    folded = [node_id for node_id in order if node_id not in runtime and node_id not in models]

    read_at_runtime = {link for node_id in runtime + bind for _, link in graph.nodes[node_id].links()}
    boundary = sorted({link for link in read_at_runtime if link.node_id in folded},
                      key=lambda link: (order.index(link.node_id), link.slot))
    live = sorted({link.node_id for link in read_at_runtime if link.node_id in models
                   and link.node_id not in runtime}, key=order.index)
    targets = sorted({link.node_id for link in boundary} | set(live) | set(bind), key=order.index)
    clip_reads = [(node_id, link) for node_id in folded for spec in defs[node_id].inputs if spec.type == "CLIP"
                  for link in [graph.nodes[node_id].inputs.get(spec.name)] if isinstance(link, Link)]
    outputs = {}
    if targets:
        ctx = RunContext(models=c.options.models, input_dir=c.options.input_dir, device=c.options.device,
                         dtype=c.options.dtype, prompt=graph.source, settings=c.options.settings)
        bind_reads = {link.node_id for node_id in bind for _, link in graph.nodes[node_id].links()}
        keep = {link.node_id for _, link in clip_reads} | bind_reads
        outputs = run_graph(graph, ctx, targets=targets, keep=keep).outputs

    values, constants = {}, {}
    for link in boundary:
        socket_type = defs[link.node_id].outputs[link.slot]
        fields, meta = flatten(socket_type, outputs[link.node_id][link.slot])
        names = {name: env.constant_env(link.node_id, link.slot, name) for name in fields}
        constants.update({names[name]: t.detach().to("cpu", copy=True).contiguous() for name, t in fields.items()})
        values[link] = EnvValue(socket_type, names, meta)
    folded_info = tuple({"node_id": node_id, "class_type": graph.nodes[node_id].class_type,
                         "outputs": [env for link, v in values.items() if link.node_id == node_id
                                     for env in v.fields.values()]} for node_id in folded)
    return replace(c, runtime_nodes=tuple(runtime), handles={node_id: outputs[node_id] for node_id in live},
                   folded_clips=tuple((node_id, f"{link.node_id}.{link.slot}", outputs[link.node_id][link.slot])
                                      for node_id, link in clip_reads if link.node_id in outputs),
                   values=values, constants=constants, folded=folded_info,
                   bindings=tuple(b for node_id in bind for b in _bindings(graph, node_id, defs[node_id], outputs)),
                   dropped_models=tuple(_dropped_models(c, order, defs, runtime, folded, bind)))


def _bindings(graph, node_id: str, node_def: NodeDef, outputs: dict) -> list[Binding]:
    """The buffers of what bind node ``node_id`` built that its run-time images replace."""
    inputs = {name: outputs[link.node_id][link.slot] for name, link in graph.nodes[node_id].links()}
    return [Binding(node_id, field, module, buffer)
            for field, places in node_def.plan.bound(inputs, outputs[node_id]).items() for module, buffer in places]


def _is_model(node_def: NodeDef) -> bool:
    return any(t in MODEL_TYPES for t in node_def.outputs)


def _dropped_models(c: Compilation, order: list[str], defs: dict[str, NodeDef], runtime: list[str],
                    folded: list[str], bind: list[str]) -> list[str]:
    """Loader outputs that only folded nodes read, directly or through other model nodes
    (CLIPSetLastLayer), as ``"<file> (<TYPE>)"``; the inputs a bind node with constant images
    needs only for what those images give (IPAdapterAdvanced's clip_vision) count as folded."""
    used = {"runtime": _reads(c, runtime), "folded": _reads(c, folded)}
    for node_id in reversed(order):   # a model node's sources are needed wherever it is
        spec = defs[node_id].plan
        compile_only = spec.compile_only if spec is not None and node_id not in bind else ()
        links = list(c.graph.nodes[node_id].links())
        for where in used.values():
            if any(link.node_id == node_id for link in where) and _is_model(defs[node_id]):
                where.update(link for name, link in links if name not in compile_only)
                used["folded"].update(link for name, link in links if name in compile_only)
    dropped = []
    for node_id in order:
        files = [c.graph.nodes[node_id].inputs.get(spec.name) for spec in defs[node_id].inputs
                 if spec.folder is not None and spec.folder != "input"]
        for slot, socket_type in enumerate(defs[node_id].outputs):
            link = Link(node_id, slot)
            if files and link in used["folded"] and link not in used["runtime"]:
                dropped.append(f"{files[0]} ({socket_type})")
    return dropped


def _reads(c: Compilation, node_ids: list[str]) -> set[Link]:
    return {link for node_id in node_ids for _, link in c.graph.nodes[node_id].links()}
