"""Module building: give every sample and module stage the torch module lowering exports."""
from __future__ import annotations

from dataclasses import replace

from kiln.compiler.stages import Compilation, Stage, bound_buffers, chain_members
from kiln.runtime.kinds.sample import BOUND_PREFIX


def build_modules(c: Compilation) -> Compilation:
    """Attach ``Stage.module``: the denoiser (UNet + CFG batch and combine) of each sample stage,
    the fused chain of each module stage (``kiln.compiler.lower``).

    Guarantees: every ``sample`` and ``module`` stage has a module (a guided denoiser for
    conditioning beyond one full-area entry per side; taking the ``bound.*`` inputs that replace
    the buffers run-time images feed); the others have none. A
    runtime cfg builds the full CFG denoiser (``cfg=None``); a constant cfg of 1 lets the
    denoiser skip the negative side.
    """
    from kiln.compiler.lower.chains import build_chain
    from kiln.compiler.lower.denoiser import build_denoiser, build_guided_denoiser

    def with_module(stage: Stage) -> Stage:
        if stage.kind == "sample":
            node = c.graph.nodes[stage.node_ids[0]]
            model = c.handles[node.inputs["model"].node_id][node.inputs["model"].slot]
            options = {side: c.values[node.inputs[side]].meta for side in ("positive", "negative")}
            bound = {BOUND_PREFIX + name: places for name, places in bound_buffers(model, options, c.bindings).items()}
            if stage.params.get("guided"):
                names = [name for name in stage.inputs if name.startswith(("positive.", "negative."))]
                return replace(stage, module=build_guided_denoiser(model, stage.params.get("cfg"), options, names,
                                                                   bound))
            return replace(stage, module=build_denoiser(model, stage.params.get("cfg"), node=node,
                                                        positive=options["positive"], negative=options["negative"],
                                                        bound=bound))
        if stage.kind == "module":
            return replace(stage, module=build_chain(chain_members(stage, c.handles), list(stage.outputs)))
        return stage

    return replace(c, stages=tuple(with_module(stage) for stage in c.stages))
