"""The plan manifest: schema, format version, and the JSON (de)serialisation writer and reader share.

A plan is a zip (docs/plans.md): ``manifest.json`` (this), ``weights.safetensors``,
``constants.safetensors``, one ``stages/<name>.pt2`` (AOTInductor) or ``stages/<name>.onnx``
per compiled stage and, for runtime prompts, the tokenizer vocabulary under ``tokenizers/``. Parsing checks
``format`` and ``format_version`` before anything else, so a plan from another kiln says
"version" rather than failing on whatever field changed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

from kiln.runtime import env
from kiln.runtime.errors import PlanError

FORMAT = "kiln-plan"
# 2: sample stages carry latent_channels and no "advanced" flag; inputs mark the seeds.
# 3: member digests are BLAKE3; CPU ONNX stages are stored optimized (``optimized``, ``relayouts``)
#    and read their weights from the plan file (``weights_offset``).
FORMAT_VERSION = 3

MANIFEST_MEMBER = "manifest.json"
WEIGHTS_MEMBER = "weights.safetensors"
CONSTANTS_MEMBER = "constants.safetensors"

ARTIFACT_SUFFIXES = {"aoti": ".pt2", "onnx": ".onnx"}   # target backend -> artifact member suffix
INPUT_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def artifact_member(stage_name: str, backend: str = "aoti") -> str:
    return f"stages/{stage_name}{ARTIFACT_SUFFIXES[backend]}"


@dataclass(frozen=True)
class RuntimeInput:
    """A widget value the plan takes at run time (manifest "inputs"), written by the compiler's
    runtime_inputs pass and read by the runtime."""

    name: str                  # "3.seed", "6.text", "5.width"
    node_id: str
    input_name: str
    type: str                  # INPUT_TYPES
    default: Any
    min: float | None = None
    max: float | None = None
    choices: list | None = None
    seed: bool = False         # the node's seed widget (what ``kiln run --seed`` sets)

    @property
    def env(self) -> str:
        return env.input_env(self.name)


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str                               # kiln.runtime.kinds.KINDS
    node_ids: list[str]
    inputs: dict[str, str]                  # stage-local name -> environment name
    outputs: dict[str, str]
    params: dict = field(default_factory=dict)
    artifact: str | None = None             # member name of the .pt2 / .onnx
    constant_names: dict[str, str] = field(default_factory=dict)  # artifact FQN -> weights key
    # ONNX: the graph was optimized for onnxruntime's CPU provider at compile time; ``relayouts``:
    # initializer -> how it was made from an original weight (kiln.runtime.ort_layouts), for LoRAs.
    optimized: bool = False
    relayouts: dict = field(default_factory=dict)

    def describe(self) -> str:
        """``stage sample_3 (sample; nodes 3)`` for error messages."""
        return f"stage {self.name} ({self.kind}; node{'s' if len(self.node_ids) != 1 else ''} " \
               f"{', '.join(self.node_ids)})"


@dataclass
class Manifest:
    kiln_version: str
    torch_version: str
    target: dict                 # {"device": "cpu", "dtype": "fp32", "backend": "aoti"} (+ "onnx_opset")
    workflow: dict
    inputs: list[RuntimeInput]
    stages: list[StageSpec]
    folded: list[dict] = field(default_factory=list)
    dropped_models: list[str] = field(default_factory=list)
    members: dict[str, str] = field(default_factory=dict)   # member name -> BLAKE3 hex digest
    # Where the weights member's data starts in the file, when optimized ONNX graphs address their
    # initializers in the file itself (a re-packed zip moves it: refused).
    weights_offset: int | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        data = asdict(self)
        ordered = {"format": data.pop("format"), "format_version": data.pop("format_version"), **data}
        return json.dumps(ordered, indent=1, sort_keys=False).encode("utf-8")

    def input(self, name: str) -> RuntimeInput | None:
        return next((spec for spec in self.inputs if spec.name == name), None)


def parse_manifest(data: bytes) -> Manifest:
    """JSON bytes -> Manifest; PlanError naming the first field that is wrong."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError("invalid_plan", f"manifest.json is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise PlanError("invalid_plan", "not a kiln plan: manifest.json has the wrong format tag",
                        expected=repr(FORMAT), found=repr(found))
    version = raw.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise PlanError("plan_version_mismatch", f"plan format version {version!r} is not supported by this kiln",
                        expected=f"format version {FORMAT_VERSION}", found=f"format version {version!r}",
                        hint="(recompile the plan with this kiln)")
    return manifest_from_dict(raw)


# target["weights"] of a plan whose fp32 weights are stored as fp16 (``kiln compile --weights fp16``).
FP16_WEIGHTS = "fp16"


def manifest_from_dict(raw: dict) -> Manifest:
    """Structural validation of a manifest dict (also what the writer checks before writing)."""
    _field(raw, "kiln_version", str)
    _field(raw, "torch_version", str)
    target = _field(raw, "target", dict)
    for key in ("device", "dtype", "backend"):
        _field(target, key, str, "target")
    if target.get("weights", FP16_WEIGHTS) != FP16_WEIGHTS:
        raise PlanError("invalid_plan", "manifest field target.weights names an unknown storage",
                        expected=repr(FP16_WEIGHTS), found=repr(target["weights"])[:60])
    _field(raw, "workflow", dict)
    inputs = [_input_spec(item, i) for i, item in enumerate(_field(raw, "inputs", list))]
    stages = [_stage_spec(item, i) for i, item in enumerate(_field(raw, "stages", list))]
    _unique([s.name for s in inputs], "input")
    _unique([s.name for s in stages], "stage")
    members = _field(raw, "members", dict)
    for name in members:   # names, not paths: nothing a plan lists may point outside it
        parts = PurePosixPath(str(name)).parts
        if not name or "\\" in name or name.startswith("/") or ".." in parts or ":" in name:
            raise PlanError("invalid_plan", "the manifest lists a member outside the plan",
                            expected="member names inside the plan, such as stages/sample_3.pt2",
                            found=repr(name)[:80], hint="(the file was altered: recompile it with kiln compile)")
    weights_offset = raw.get("weights_offset")
    if weights_offset is not None and (type(weights_offset) is not int or weights_offset < 0):
        raise PlanError("invalid_plan", "manifest field weights_offset is malformed", expected="a file offset",
                        found=repr(weights_offset)[:60])
    for required in (WEIGHTS_MEMBER, CONSTANTS_MEMBER):
        if required not in members:
            raise PlanError("invalid_plan", f"manifest does not list member {required}")
    for stage in stages:
        if stage.artifact is not None and stage.artifact not in members:
            raise PlanError("invalid_plan", f"{stage.describe()} names artifact {stage.artifact!r}, "
                            "which is not a listed member")
        vocabulary = stage.params.get("vocabulary")
        if stage.kind == "tokenize" and vocabulary not in members:
            raise PlanError("invalid_plan", f"{stage.describe()} names vocabulary {vocabulary!r}, "
                            "which is not a listed member")
    return Manifest(kiln_version=raw["kiln_version"], torch_version=raw["torch_version"], target=dict(target),
                    workflow=raw["workflow"], inputs=inputs, stages=stages,
                    folded=list(_field(raw, "folded", list)), dropped_models=list(_field(raw, "dropped_models", list)),
                    members=dict(members), weights_offset=weights_offset, format=raw.get("format", FORMAT),
                    format_version=raw.get("format_version", FORMAT_VERSION))


def _input_spec(item: Any, index: int) -> RuntimeInput:
    where = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise PlanError("invalid_plan", f"manifest {where} is not an object")
    spec = RuntimeInput(name=_field(item, "name", str, where), node_id=_field(item, "node_id", str, where),
                        input_name=_field(item, "input_name", str, where), type=_field(item, "type", str, where),
                        default=item.get("default"), min=item.get("min"), max=item.get("max"),
                        choices=item.get("choices"), seed=item.get("seed") is True)
    if spec.type not in INPUT_TYPES:
        raise PlanError("invalid_plan", f"manifest {where} ({spec.name}) has an unknown type",
                        expected=" | ".join(INPUT_TYPES), found=repr(spec.type))
    if spec.type == "COMBO" and not isinstance(spec.choices, list):
        raise PlanError("invalid_plan", f"manifest {where} ({spec.name}) is a COMBO without choices")
    return spec


def _stage_spec(item: Any, index: int) -> StageSpec:
    where = f"stages[{index}]"
    if not isinstance(item, dict):
        raise PlanError("invalid_plan", f"manifest {where} is not an object")
    stage = StageSpec(name=_field(item, "name", str, where), kind=_field(item, "kind", str, where),
                      node_ids=[str(n) for n in _field(item, "node_ids", list, where)],
                      inputs=dict(_field(item, "inputs", dict, where)),
                      outputs=dict(_field(item, "outputs", dict, where)),
                      params=dict(_field(item, "params", dict, where)),
                      artifact=item.get("artifact"), constant_names=dict(item.get("constant_names") or {}),
                      optimized=item.get("optimized") is True, relayouts=dict(item.get("relayouts") or {}))
    unknown = set(stage.relayouts) - set(stage.constant_names)
    if unknown:
        raise PlanError("invalid_plan", f"manifest {where} ({stage.name}) re-lays weights it does not have",
                        found=", ".join(sorted(unknown)[:4]))
    return stage


def _field(raw: dict, key: str, kind: type, where: str = "") -> Any:
    value = raw.get(key)
    if not isinstance(value, kind):
        name = f"{where}.{key}" if where else key
        raise PlanError("invalid_plan", f"manifest field {name} is missing or malformed",
                        expected=f"a JSON {_JSON_NAMES[kind]}", found=repr(value)[:60])
    return value


_JSON_NAMES = {str: "string", dict: "object", list: "array"}


def _unique(names: list[str], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise PlanError("invalid_plan", f"manifest lists {what} {name!r} twice")
        seen.add(name)
