"""``lora`` (a LoraLoader whose file or strengths are runtime inputs): names the LoRA that the
plan's weights carry for this run; the executor patches them before the next compiled stage."""
from __future__ import annotations

from pathlib import Path

from kiln.runtime.errors import PlanError
from kiln.runtime.files import find_in_folders
from kiln.runtime.kinds.base import StageKind
from kiln.runtime.lora import LoraSpec


class Lora(StageKind):
    """Settings lora_name (a file of the run's LoRA folders), strength_model, strength_clip;
    params ``model`` / ``clip``: the loader outputs ("4.0") whose weights it patches. No outputs:
    it appends to ``ctx.loras``. Both strengths 0 add nothing (LoraLoader passes its inputs on)."""

    name = "lora"
    settings = ("lora_name", "strength_model", "strength_clip")
    shown = ("lora_name", "strength_model", "strength_clip")

    def run(self, stage, args, ctx):
        name = str(self.setting(stage, args, "lora_name"))
        strength_model, strength_clip = (float(self.setting(stage, args, k)) for k in self.settings[1:])
        if strength_model == 0 and strength_clip == 0:
            return {}
        groups = tuple(stage.params[k] for k in ("model", "clip") if k in stage.params)
        node_id = stage.node_ids[0]
        class_type = ((ctx.prompt or {}).get(node_id) or {}).get("class_type")
        path = resolve_lora(name, ctx.lora_dirs, node_id, class_type)
        ctx.loras.append(LoraSpec(path, strength_model, strength_clip, groups))
        return {}


def resolve_lora(name: str, folders, node_id: str, class_type: str | None) -> Path:
    """``name`` as a file in one of the LoRA ``folders`` (``find_in_folders``)."""
    where = {"node_id": node_id, "class_type": class_type, "input_name": "lora_name"}
    if not folders:
        raise PlanError("missing_lora", "this plan applies a LoRA by name and was given no LoRA folders",
                        **where, expected="kiln run x.plan --models <ComfyUI models folder> (its loras/)",
                        found=repr(name))
    try:
        return find_in_folders(name, folders, "a LoRA")
    except ValueError:
        raise PlanError("invalid_input", "a LoRA name is a file inside the LoRA folders", **where,
                        expected="a relative name such as style.safetensors", found=repr(name)) from None
    except FileNotFoundError:
        raise PlanError("missing_lora", "no such LoRA file", **where,
                        expected="a file in " + ", ".join(str(f) for f in folders), found=repr(name)) from None
