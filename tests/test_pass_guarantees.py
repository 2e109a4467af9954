"""Each compiler pass keeps the promise its docstring's "Guarantees:" section makes: one
``ensures_<pass>(before, after)`` per pass, checked after every pass on every workflow kind the
plans take, and the pass order rules (``PASS_ORDER``) enforced."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kiln.compiler.graph import Link
from kiln.compiler.passes import build_modules, dead_nodes, fold_constants, merge_identical, runtime_inputs
from kiln.compiler.pipeline import PASSES, check_pass_order, run_passes, validate
from kiln.compiler.stages import MODEL_TYPES, Compilation, CompileOptions, node_def
from kiln.compiler.workflow import parse_workflow
from kiln.nodes import registry
from kiln.nodes.folders import ModelFolders
from kiln.runtime import env
from kiln.runtime.kinds import KINDS
from workflows import PLAN_VARIANTS, hires_fix, img2img, txt2img, variant

_PYTHON_TYPES = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool, "COMBO": str}


def _dependencies(c: Compilation, node_id: str) -> set[str]:
    return set(c.graph.topological_order([node_id]))


# --- one ensures function per pass ------------------------------------------------------------
def ensures_validate(before: Compilation, after: Compilation) -> None:
    for node in after.graph.nodes.values():
        definition = registry.get(node.class_type)
        assert definition is not None, node.class_type
        for spec in definition.inputs:
            value = node.inputs.get(spec.name)
            if value is None:
                assert spec.optional or spec.is_widget, (node.id, spec.name)
                continue
            if isinstance(value, Link):
                source = after.graph.nodes[value.node_id]
                assert registry.get(source.class_type).outputs[value.slot] == spec.type, (node.id, spec.name)
                continue
            assert type(value) is _PYTHON_TYPES[spec.type], (node.id, spec.name, value)
            if spec.type in ("INT", "FLOAT"):
                assert spec.min <= value <= spec.max, (node.id, spec.name, value)


def ensures_dead_nodes(before: Compilation, after: Compilation) -> None:
    outputs = [n for n, node in after.graph.nodes.items() if registry.get(node.class_type).output_node]
    assert set(after.graph.nodes) == set(after.graph.topological_order(outputs))
    for node in after.graph.nodes.values():
        assert all(link.node_id in after.graph.nodes for _, link in node.links())
    assert after.graph.source == before.graph.source


def ensures_runtime_inputs(before: Compilation, after: Compilation) -> None:
    order = {node_id: i for i, node_id in enumerate(after.graph.topological_order())}
    positions = []
    for runtime_input in after.inputs:
        node = after.graph.nodes[runtime_input.node_id]
        definition = registry.get(node.class_type)
        spec = definition.input(runtime_input.input_name)
        assert spec is not None and spec.is_widget
        if spec.folder is not None:   # only files a plan opens at run time (a LoRA), as names
            assert runtime_input.input_name in definition.plan.runtime_widgets and runtime_input.type == "STRING"
        assert not isinstance(node.inputs.get(spec.name), Link)
        assert runtime_input.default == node.inputs.get(spec.name, spec.default)
        if spec.type in ("INT", "FLOAT"):
            assert spec.min <= runtime_input.min <= runtime_input.default <= runtime_input.max <= spec.max
        if spec.type == "COMBO" and not callable(spec.choices) and spec.folder is None:
            assert runtime_input.choices == list(spec.choices)
        assert runtime_input.seed == (spec.name == definition.seed)
        positions.append((order[node.id], [s.name for s in definition.inputs].index(spec.name)))
    assert positions == sorted(positions)
    seeds = {(i.node_id, i.input_name) for i in after.inputs}
    for node_id, node in after.graph.nodes.items():
        seed = registry.get(node.class_type).seed
        if seed is not None:
            assert (node_id, seed) in seeds


def ensures_runtime_loras(before: Compilation, after: Compilation) -> None:
    taken = {node.id for node in after.runtime_loras}
    assert not taken & set(after.graph.nodes)
    assert all(link.node_id not in taken for node in after.graph.nodes.values() for _, link in node.links())
    with_inputs = {i.node_id for i in after.inputs}
    kinds = {n: getattr(registry.get(node.class_type).plan, "kind", None) for n, node in before.graph.nodes.items()}
    assert taken == {n for n, kind in kinds.items() if n in with_inputs and kind == "lora"}
    for node in after.runtime_loras:
        for name in ("model", "clip"):
            if isinstance(node.inputs.get(name), Link):
                assert node.inputs[name].node_id in after.graph.nodes and node.inputs[name].node_id not in taken


def ensures_merge_identical(before: Compilation, after: Compilation) -> None:
    pinned = {i.node_id for i in after.inputs}
    seen = {}
    for node_id in after.graph.topological_order():
        node = after.graph.nodes[node_id]
        definition = registry.get(node.class_type)
        assert all(link.node_id in after.graph.nodes for _, link in node.links())
        if definition.seed is not None or definition.output_node or node_id in pinned:
            continue
        key = (node.class_type, tuple(sorted((k, repr(v)) for k, v in node.inputs.items())))
        assert key not in seen, f"nodes {seen.get(key)} and {node_id} are identical"
        seen[key] = node_id
    kept = {node_id for node_id, node in before.graph.nodes.items()
            if registry.get(node.class_type).seed is not None or registry.get(node.class_type).output_node
            or node_id in pinned}
    assert kept <= set(after.graph.nodes)


def ensures_fold_constants(before: Compilation, after: Compilation) -> None:
    order = after.graph.topological_order()
    assert list(after.runtime_nodes) == [n for n in order if n in set(after.runtime_nodes)]
    runtime = set(after.runtime_nodes)
    for node_id in after.runtime_nodes:
        for _, link in after.graph.nodes[node_id].links():
            if link.node_id in runtime:
                continue
            socket = registry.get(after.graph.nodes[link.node_id].class_type).outputs[link.slot]
            if socket in MODEL_TYPES:
                assert link.node_id in after.handles
                continue
            value = after.values[link]
            for field, name in value.fields.items():
                assert name == env.constant_env(link.node_id, link.slot, field)
                assert after.constants[name].device.type == "cpu"
    for binding in after.bindings:   # bind nodes: evaluated at compile time, reading run-time images
        node = after.graph.nodes[binding.node_id]
        spec = registry.get(node.class_type).plan
        assert binding.node_id not in runtime and spec.kind == "bind" and binding.field in spec.computes
        assert any(link.node_id in runtime for name, link in node.links() if name in spec.sockets)
        assert binding.buffer in binding.module._buffers


def ensures_partition_stages(before: Compilation, after: Compilation) -> None:
    available = set(after.constants) | {i.env for i in after.inputs}
    read = set()
    for stage in after.stages:
        assert stage.kind in KINDS
        for name in stage.inputs.values():
            assert name in available or name.startswith(env.RUNTIME_INPUT_PREFIX), (stage.name, name)
            read.add(name)
        available.update(stage.outputs.values())
    assert set(after.constants) <= read
    for stage in after.stages:
        if stage.kind == "module":
            assert set(stage.outputs.values()) <= read, stage.name
    covered = {node_id for stage in after.stages for node_id in stage.node_ids}
    assert covered == set(after.runtime_nodes) | {node.id for node in after.runtime_loras}


def ensures_fuse_stages(before: Compilation, after: Compilation) -> None:
    ensures_partition_stages(before, after)
    for producer in after.stages:
        if producer.kind != "module":
            continue
        readers = [s for s in after.stages if set(producer.outputs.values()) & set(s.inputs.values())]
        assert not (len(readers) == 1 and readers[0].kind == "module"), f"{producer.name} could still fuse"
    members = [m.id for stage in after.stages for m in stage.members]
    assert sorted(members) == sorted(m.id for stage in before.stages for m in stage.members)


def ensures_build_modules(before: Compilation, after: Compilation) -> None:
    for stage in after.stages:
        assert (stage.module is not None) == KINDS[stage.kind].compiled, stage.name
        if stage.kind == "module":
            assert all(node_def(m.class_type).plan.kind == "module" for m in stage.members)


ENSURES = {name[len("ensures_"):]: fn for name, fn in globals().items() if name.startswith("ensures_")}


# --- the checks --------------------------------------------------------------------------------
def test_every_pass_states_its_guarantees_and_has_an_ensures_function():
    for compiler_pass in PASSES:
        assert "Guarantees:" in (compiler_pass.__doc__ or ""), compiler_pass.__name__
    assert set(ENSURES) == {p.__name__ for p in PASSES}


CASES = {
    "txt2img": (txt2img, ()),
    "txt2img-runtime-sizes-and-prompt": (txt2img, ("5.width=64..96", "5.batch_size=1..2", "6.text", "3.cfg")),
    "img2img": (img2img, ()),
    "img2img-runtime-image": (img2img, ("10.image",)),
    "hires-fix": (hires_fix, ("14.steps",)),
    "duplicate-prompts": (lambda: variant(txt2img(), "7", text="a red fox"), ()),
    **{name: (make, ()) for name, make in PLAN_VARIANTS.items()},
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_pass_keeps_its_guarantees(case, models_dir, input_dir):
    make, inputs = CASES[case]
    c = Compilation(parse_workflow(make()), CompileOptions(models=ModelFolders.from_models_dir(models_dir),
                                                           input_dir=str(input_dir), inputs=inputs))
    with torch.inference_mode():
        for compiler_pass in PASSES:
            after = run_passes(c, [compiler_pass])
            ENSURES[compiler_pass.__name__](c, after)
            c = after


def test_each_pass_keeps_its_guarantees_with_a_runtime_lora(tmp_path):
    """A LoraLoader compiled with --input 30.lora_name, after a constant one (model only)."""
    from kiln.demo import write_demo_models
    from lora_files import kohya_everything, read, save, with_loras

    models = tmp_path / "models"
    write_demo_models(models)
    lora, _ = kohya_everything(read(models / "checkpoints" / "tiny-sd15.safetensors"), 1.0, 1.0,
                               torch.Generator().manual_seed(0))
    save(lora, models / "loras" / "style.safetensors")
    workflow = with_loras(txt2img(), ("style.safetensors", 0.5, 0.0), ("style.safetensors", 0.8, 0.4))
    c = Compilation(parse_workflow(workflow), CompileOptions(models=ModelFolders.from_models_dir(models),
                                                             inputs=("31.lora_name", "31.strength_clip", "6.text")))
    with torch.inference_mode():
        for compiler_pass in PASSES:
            after = run_passes(c, [compiler_pass])
            ENSURES[compiler_pass.__name__](c, after)
            c = after
    assert [s.kind for s in c.stages][:2] == ["lora", "tokenize"] and c.stages[0].params["model"] == "30.0"


def test_an_ensures_function_catches_a_broken_pass(models_dir):
    """The checks can fail: a fold that forgot a constant is caught."""
    options = CompileOptions(models=ModelFolders.from_models_dir(models_dir))
    c = run_passes(Compilation(parse_workflow(txt2img()), options), PASSES[:4])
    folded = fold_constants(c)
    broken = replace(folded, constants={})
    with pytest.raises(KeyError):
        ensures_fold_constants(c, broken)


def test_pass_order_rules_are_enforced():
    check_pass_order(PASSES)
    with pytest.raises(ValueError, match="pass merge_identical runs before runtime_inputs.*never merge with a twin"):
        check_pass_order([validate, dead_nodes, merge_identical, runtime_inputs])
    with pytest.raises(ValueError, match="pass build_modules runs before fuse_stages"):
        run_passes(Compilation(parse_workflow(txt2img())), [build_modules, PASSES[-2]])
