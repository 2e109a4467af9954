"""Stage kinds: one class per kind (check, run, example outputs, describe), used by the plan
writer and reader (checks), the executor (run), the lowering's shape walk (example outputs) and
``kiln inspect`` (describe). docs/plans.md, "Stage kinds", pins each kind's inputs and params."""
from __future__ import annotations

from kiln.runtime.errors import PlanError
from kiln.runtime.kinds.base import StageContext, StageKind
from kiln.runtime.kinds.empty_latent import EmptyLatent
from kiln.runtime.kinds.load_image import LoadImage
from kiln.runtime.kinds.lora import Lora
from kiln.runtime.kinds.module import Module
from kiln.runtime.kinds.sample import Sample
from kiln.runtime.kinds.save_image import SaveImage
from kiln.runtime.kinds.tokenize import Tokenize

KINDS: dict[str, StageKind] = {kind.name: kind for kind in (Tokenize(), Sample(), Module(), SaveImage(),
                                                            EmptyLatent(), Lora(), LoadImage())}

__all__ = ["KINDS", "StageContext", "StageKind", "kind_of"]


def kind_of(stage) -> StageKind:
    try:
        return KINDS[stage.kind]
    except KeyError:
        raise PlanError("invalid_plan", f"stage {stage.name} has an unknown stage kind",
                        expected=" | ".join(KINDS), found=repr(stage.kind)) from None
