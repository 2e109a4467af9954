"""Stage fusion: chains of module stages become one module (one export, no intermediate copies)."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.stages import Compilation, Stage


def fuse_stages(c: Compilation) -> Compilation:
    """Merge a ``module`` stage into the one ``module`` stage that reads its outputs, to a fixed point.

    HiRes fix's VAEDecode -> ImageUpscaleWithModel -> ImageScaleBy -> VAEEncode becomes one
    stage, and the final VAEDecode fuses with the 8-bit conversion feeding save_image.
    Guarantees: a fused stage sits where its last part was, takes the parts' inputs in order
    (less the intermediates), gives the last part's outputs and runs the parts' members in
    order; a stage whose outputs anything else reads (another stage, or two) is not fused, so
    no value is computed twice and every stage input is still produced before it is read.
    """
    stages = list(c.stages)
    while (pair := _fusable(stages)) is not None:
        first, second = pair
        fused = _fuse(stages[first], stages[second])
        stages[second] = fused
        del stages[first]
    return replace(c, stages=tuple(stages))


def _fusable(stages: list[Stage]) -> tuple[int, int] | None:
    for i, producer in enumerate(stages):
        if producer.kind != "module":
            continue
        produced = set(producer.outputs.values())
        readers = [j for j, s in enumerate(stages) if produced & set(s.inputs.values())]
        if len(readers) == 1 and stages[readers[0]].kind == "module":
            return i, readers[0]
    return None


def _fuse(first: Stage, second: Stage) -> Stage:
    intermediates = set(first.outputs.values())
    inputs = dict(first.inputs)
    inputs.update((name, env) for name, env in second.inputs.items() if env not in intermediates)
    node_ids = first.node_ids + [n for n in second.node_ids if n not in first.node_ids]
    return Stage(name="module_" + "-".join(node_ids), kind="module", node_ids=node_ids, inputs=inputs,
                 outputs=dict(second.outputs), params={**first.params, **second.params},
                 members=first.members + second.members)
