"""What every stage kind has: its signature (tensor inputs, settings, outputs), the checks the
plan writer and reader run, its run, example outputs for the lowering's shape walk, and the
line ``kiln inspect`` prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from kiln.kernels.clip_bpe import ClipBpe
from kiln.kernels.settings import Settings
from kiln.runtime.errors import PlanError
from kiln.runtime.images import SavedImage
from kiln.runtime.manifest import StageSpec


@dataclass
class StageContext:
    """What stages share during one plan run."""

    device: torch.device
    compiled: Mapping[str, Callable[..., list[torch.Tensor]]]   # stage name -> compiled artifact
    output_dir: str
    prompt: dict | None                                          # embedded into saved PNGs
    on_step: Callable[[str, int, int], None] | None = None       # (stage name, step, total)
    tokenizers: Mapping[str, ClipBpe] = field(default_factory=dict)  # vocabulary member -> tokenizer
    settings: Settings = field(default_factory=Settings)
    images: dict[str, list[SavedImage]] = field(default_factory=dict)   # output node id -> images written
    extra_pnginfo: dict | None = None                            # more PNG text chunks (the UI workflow)
    on_preview: Callable[[str, Any, float], None] | None = None  # (stage, denoised, latent scale factor)
    lora_dirs: tuple[Path, ...] = ()                             # where ``lora`` stages find files by name
    loras: list = field(default_factory=list)                    # LoraSpec: what ``lora`` stages named
    input_dir: Path | None = None                                # where ``load_image`` stages read files
    on_model_call: Callable[[], None] | None = None              # before each denoiser evaluation


class StageKind:
    """One stage kind. A *setting* is read from the stage's inputs when it is a runtime input
    there, else from its params (``setting``)."""

    name: ClassVar[str]
    compiled: ClassVar[bool] = False            # carries an artifact (a compiled module)
    required: ClassVar[tuple[str, ...]] = ()    # stage-local tensor inputs
    optional: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[tuple[str, ...]] = ()    # each an input or a param
    outputs: ClassVar[tuple[str, ...] | None] = ()   # None: any names
    shown: ClassVar[tuple[str, ...]] = ()       # params ``kiln inspect`` shows

    # --- checks -------------------------------------------------------------------------------
    def signature(self, stage: StageSpec) -> tuple[tuple, tuple, tuple]:
        """(required inputs, optional inputs, settings) of this stage (some kinds vary by params)."""
        return self.required, self.optional, self.settings

    def check(self, stage: StageSpec) -> None:
        """Refuse a stage whose inputs, settings or outputs do not fit its kind (a compiler bug or
        an altered plan, said clearly)."""
        required, optional, settings = self.signature(stage)
        missing = [name for name in required if name not in stage.inputs]
        missing += [name for name in settings if name not in stage.inputs and name not in stage.params]
        if missing:
            raise PlanError("invalid_plan", f"{stage.describe()} lacks {', '.join(missing)}")
        if self.outputs is not None:
            unknown = [name for name in stage.inputs if name not in required + optional + settings]
            unknown += [name for name in stage.outputs if name not in self.outputs]
            if unknown:
                raise PlanError("invalid_plan", f"{stage.describe()} has inputs or outputs its kind does not take: "
                                f"{', '.join(unknown)}")

    @staticmethod
    def check_choice(stage: StageSpec, name: str, choices) -> None:
        if name in stage.params and stage.params[name] not in choices:
            raise PlanError("invalid_plan", f"{stage.describe()} has an unknown {name}",
                            expected=f"one of {', '.join(choices)}", found=repr(stage.params[name]))

    # --- running --------------------------------------------------------------------------------
    @staticmethod
    def setting(stage: StageSpec, args: Mapping[str, Any], name: str) -> Any:
        value = args[name] if name in args else stage.params[name]
        return value.item() if isinstance(value, torch.Tensor) else value

    def run(self, stage: StageSpec, args: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
        """Outputs by stage-local name from inputs by stage-local name."""
        raise NotImplementedError

    def example_outputs(self, stage: StageSpec, inputs: dict[str, Any], *, module, min_batch: int,
                        device: torch.device) -> dict[str, torch.Tensor]:
        """Outputs of the right shapes and dtypes (values unimportant) for the lowering's shape
        walk, from example inputs; ``min_batch`` raises batch sizes (dynamic dims need >= 2)."""
        return {}

    # --- kiln inspect ---------------------------------------------------------------------------
    def describe(self, stage: StageSpec) -> str:
        """``sampler_name=euler, steps=20, ...``: the constant settings worth a glance."""
        return ", ".join(f"{k}={stage.params[k]}" for k in self.shown if k in stage.params)
