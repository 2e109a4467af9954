"""Plan files and the runtime: layout, refusals, inputs, inspect, and sampler parity with the interpreter.

Plans are built by hand with PlanWriter from two trivially small modules compiled with
AOTInductor (a denoiser with the plan contract's signature around a tiny "UNet", and a
latent -> uint8 "decode"). Compiles are cached by content hash in pytest's cache folder.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import zipfile
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from kiln.cli import main
from kiln.kernels.ksampler import ksampler_schedule
from kiln.kernels.model_sampling import SD15_LATENT, ModelSamplingDiscrete
from kiln.nodes.registry import RunContext
from kiln.nodes.sampling import common_ksampler
from kiln.runtime.artifacts import CompiledStage, constant_fqns
from kiln.runtime.errors import PlanError
from kiln.runtime.executor import bind_inputs, run_plan
from kiln.runtime.manifest import StageSpec
from kiln.runtime.plan import PlanReader, load_plan
from kiln.runtime.kinds import KINDS, StageContext
from kiln.runtime.writer import MEMBER_ALIGNMENT, PlanWriter

CONTEXT_DIM, TOKENS = 8, 3


# --- the tiny modules ----------------------------------------------------------------------
class TinyUNet(torch.nn.Module):
    """(scaled x, timestep, context) -> eps: mostly the input itself (as a trained eps model's
    prediction is, so samples stay at unit scale), with every input mattering."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(CONTEXT_DIM, 4)

    def forward(self, xc, t, context):
        return 0.9 * xc + 0.1 * torch.tanh(self.conv(xc)) + 0.05 * self.proj(context.mean(1))[:, :, None, None] \
            + 0.02 * (t / 1000.0)[:, None, None, None]


class EagerModel:
    """A MODEL handle (kiln.nodes.values.DiffusionModelHandle) the interpreter's guider drives."""

    arch, latent_format, in_channels, dtype, device = "sd1", SD15_LATENT, 4, torch.float32, torch.device("cpu")

    def __init__(self, unet):
        self.unet = unet
        self.model_sampling = ModelSamplingDiscrete("eps")

    def apply_model(self, x, sigma, context, y=None, c_concat=None, control=None, cond_or_uncond=(1, 0)):
        ms = self.model_sampling
        out = self.unet(ms.calculate_input(sigma, x), ms.timestep(sigma).float(), context)
        return ms.calculate_denoised(sigma, out.float(), x)

    def encode_adm(self, pooled_output, **sizes):
        return None


class Denoiser(torch.nn.Module):
    """The plan's denoiser contract: the CFG batch [uncond, cond] through the UNet, then the combine."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.register_buffer("log_sigmas", ModelSamplingDiscrete("eps").log_sigmas.clone())

    def forward(self, x, sigma, cond_context, uncond_context, cfg):
        b = x.shape[0]
        x2, s2 = torch.cat([x, x]), torch.cat([sigma, sigma])
        context = torch.cat([uncond_context.expand(b, -1, -1), cond_context.expand(b, -1, -1)])
        s = s2.view(-1, 1, 1, 1)
        t = (s2.log()[None, :] - self.log_sigmas[:, None]).abs().argmin(dim=0).float()
        denoised = x2 - self.unet(x2 / (s ** 2 + 1.0) ** 0.5, t, context) * s
        uncond, cond = denoised[:b], denoised[b:]
        return uncond + (cond - uncond) * cfg, uncond


class TinyDecode(torch.nn.Module):
    """Raw latent -> uint8 NHWC pixels (the final decode + 8-bit conversion module)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def forward(self, samples):
        image = torch.sigmoid(self.conv(samples)).permute(0, 2, 3, 1)
        return (255.0 * image).clamp(0, 255).to(torch.uint8)


def tiny_modules() -> tuple[Denoiser, TinyDecode]:
    torch.manual_seed(0)   # tiny biases end up inlined in the compiled code: weights must be reproducible
    return Denoiser(TinyUNet()).eval(), TinyDecode().eval()


def tiny_artifacts(cache_root: Path) -> dict[str, Path]:
    """AOTInductor packages of both modules (weights left out), compiled once per content hash."""
    source = "".join(inspect.getsource(obj) for obj in (TinyUNet, Denoiser, TinyDecode, tiny_modules, tiny_artifacts))
    key = hashlib.sha256((source + torch.__version__).encode()).hexdigest()[:16]
    folder = cache_root / key
    paths = {"denoiser": folder / "denoiser.pt2", "decode": folder / "decode.pt2"}
    if all(p.is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    from torch._inductor import aoti_compile_and_package

    denoiser, decode = tiny_modules()
    b, h, w = torch.export.Dim("b", min=1, max=64), torch.export.Dim("h", min=2, max=256), \
        torch.export.Dim("w", min=2, max=256)
    # distinct example tensors: an example passed for two inputs makes export treat them as one
    cond, uncond = conditioning()
    exported = {
        "denoiser": torch.export.export(denoiser, (torch.randn(2, 4, 8, 8), torch.rand(2) + 0.5, cond, uncond,
                                                   torch.tensor(7.5)),
                                        dynamic_shapes=({0: b, 2: h, 3: w}, {0: b}, None, None, None)),
        "decode": torch.export.export(decode, (torch.randn(2, 4, 8, 8),), dynamic_shapes=({0: b, 2: h, 3: w},)),
    }
    for name, program in exported.items():
        tmp = folder / f"{name}.part.pt2"
        aoti_compile_and_package(program, package_path=str(tmp),
                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
        os.replace(tmp, paths[name])
    return paths


def conditioning() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, TOKENS, CONTEXT_DIM, generator=g), torch.randn(1, TOKENS, CONTEXT_DIM, generator=g)


# --- a hand-built HiRes-like plan: empty latent -> sample -> sample (refine) -> decode -> save --------
WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 3, "steps": 4, "cfg": 7.5, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "10": {"class_type": "KSampler", "inputs": {"seed": 11, "steps": 3, "cfg": 4.0, "sampler_name": "dpmpp_2m",
                                                "scheduler": "karras", "denoise": 0.5, "model": ["4", 0],
                                                "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["3", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "plan", "images": ["8", 0]}},
}
COND, UNCOND = "const.6.0.0.cond", "const.7.0.0.cond"


def _sampler_params(node_id: str) -> dict:
    i = WORKFLOW[node_id]["inputs"]
    return {k: i[k] for k in ("steps", "cfg", "sampler_name", "scheduler", "denoise")} | {
        "prediction": "eps", "scale_factor": 0.18215, "latent_channels": 4, "seed": i["seed"]}


def plan_manifest(device: str = "cpu") -> dict:
    return {
        "target": {"device": device, "dtype": "fp32", "backend": "aoti"},
        "workflow": WORKFLOW,
        "inputs": [
            {"name": "3.seed", "node_id": "3", "input_name": "seed", "type": "INT", "default": 3,
             "min": 0, "max": 2 ** 64 - 1, "seed": True},
            {"name": "5.width", "node_id": "5", "input_name": "width", "type": "INT", "default": 64,
             "min": 16, "max": 128},
            {"name": "3.sampler_name", "node_id": "3", "input_name": "sampler_name", "type": "COMBO",
             "default": "euler", "choices": ["euler", "euler_ancestral", "dpmpp_2m"]},
        ],
        "stages": [
            {"name": "empty_latent_5", "kind": "empty_latent", "node_ids": ["5"], "inputs": {"width": "in.5.width"},
             "outputs": {"samples": "5.0.samples"}, "params": {"height": 48, "batch_size": 1, "channels": 4}},
            {"name": "sample_3", "kind": "sample", "node_ids": ["3"],
             "inputs": {"latent": "5.0.samples", "cond_context": COND, "uncond_context": UNCOND,
                        "seed": "in.3.seed", "sampler_name": "in.3.sampler_name"},
             "outputs": {"samples": "3.0.samples"}, "params": _sampler_params("3")},
            {"name": "sample_10", "kind": "sample", "node_ids": ["10"],
             "inputs": {"latent": "3.0.samples", "cond_context": COND, "uncond_context": UNCOND},
             "outputs": {"samples": "10.0.samples"}, "params": _sampler_params("10")},
            {"name": "module_8", "kind": "module", "node_ids": ["8"], "inputs": {"samples": "10.0.samples"},
             "outputs": {"images": "8.0.value"}, "params": {}},
            {"name": "save_9", "kind": "save_image", "node_ids": ["9"], "inputs": {"images": "8.0.value"},
             "outputs": {}, "params": {"filename_prefix": "plan", "node_id": "9"}},
        ],
        "folded": [{"node_id": "6", "class_type": "CLIPTextEncode", "outputs": [COND]},
                   {"node_id": "7", "class_type": "CLIPTextEncode", "outputs": [UNCOND]}],
        "dropped_models": ["tiny.safetensors (text encoder)"],
    }


def write_plan(path: Path, artifacts: dict[str, Path], manifest: dict | None = None, cache: Path | None = None) -> Path:
    denoiser, decode = tiny_modules()
    cond, uncond = conditioning()
    writer = PlanWriter(path, cache=cache or path.parent / "cache")
    unet_weights = dict(denoiser.state_dict())
    writer.add_artifact("sample_3", artifacts["denoiser"], unet_weights)
    writer.add_artifact("sample_10", artifacts["denoiser"], {k: v.clone() for k, v in unet_weights.items()})
    writer.add_artifact("module_8", artifacts["decode"], dict(decode.state_dict()))
    writer.add_constants({COND: cond, UNCOND: uncond})
    return writer.write(manifest or plan_manifest())


def eager_reference(seed: int = 3, width: int = 64, sampler_name: str = "euler") -> np.ndarray:
    """The interpreter's result for the plan: common_ksampler with the eager modules, then decode."""
    denoiser, decode = tiny_modules()
    model = EagerModel(denoiser.unet)
    cond, uncond = conditioning()
    positive, negative = [(cond, {})], [(uncond, {})]
    latent = {"samples": torch.zeros([1, 4, 48 // 8, width // 8])}
    ctx = RunContext()
    with torch.inference_mode():
        for node_id, node_seed in (("3", seed), ("10", 11)):
            p = _sampler_params(node_id) | ({"sampler_name": sampler_name} if node_id == "3" else {})
            (latent,) = common_ksampler(ctx, model, node_seed, p["cfg"], p, positive, negative, latent)
        return decode(latent["samples"]).numpy()


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(artifact_cache_dir):
    return tiny_artifacts(artifact_cache_dir)


@pytest.fixture(autouse=True)
def artifact_cache(tmp_path, monkeypatch):
    """The cache the CLI (KILN_CACHE_DIR) and the library calls (Settings) use in a test."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def plan(tmp_path, artifacts):
    return write_plan(tmp_path / "hires.plan", artifacts)


# --- layout --------------------------------------------------------------------------------
def test_plan_layout_aligned_hashed_and_weights_stored_once(plan, artifacts):
    reader = PlanReader(plan)
    names = sorted(reader.entries)
    assert names == ["constants.safetensors", "manifest.json", "stages/module_8.pt2", "stages/sample_3.pt2",
                     "weights.safetensors"]
    for name, info in reader.entries.items():
        assert info.compress_type == zipfile.ZIP_STORED
        assert reader.member_range(name)[0] % MEMBER_ALIGNMENT == 0
        if name != "manifest.json":
            assert blake3.blake3(zipfile.ZipFile(plan).read(name)).hexdigest() == reader.manifest.members[name]
    stages = {s.name: s for s in reader.manifest.stages}
    # two sampler stages, one copy of the denoiser and its weights
    assert stages["sample_3"].constant_names == stages["sample_10"].constant_names
    assert stages["sample_3"].artifact == stages["sample_10"].artifact == "stages/sample_3.pt2"
    denoiser, _ = tiny_modules()
    needed = set(stages["sample_3"].constant_names.values()) | set(stages["module_8"].constant_names.values())
    with zipfile.ZipFile(plan) as zf:
        stored = zf.read("weights.safetensors")
    (plan.parent / "w.safetensors").write_bytes(stored)
    weights = load_file(plan.parent / "w.safetensors")   # a standard safetensors file
    assert weights.keys() == needed and "log_sigmas" in stages["sample_3"].constant_names
    mapped = reader.tensors("weights.safetensors")   # zero-copy views of the mapped plan
    assert mapped.keys() == weights.keys() and all(torch.equal(mapped[k], weights[k]) for k in weights)
    assert torch.equal(weights[stages["sample_3"].constant_names["unet.conv.weight"]], denoiser.unet.conv.weight)
    assert reader.tensors("constants.safetensors").keys() == {COND, UNCOND}
    assert [p.name for p in plan.parent.iterdir() if p.name.startswith(".")] == []   # no temp files left


def test_write_is_atomic(tmp_path, artifacts, monkeypatch):
    import kiln.runtime.writer as writer_module

    target = tmp_path / "x.plan"
    target.write_bytes(b"previous")
    calls = []

    def failing(zf, name, content):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        zf.writestr(name, b"")

    monkeypatch.setattr(writer_module, "_write_aligned", failing)
    with pytest.raises(OSError, match="disk full"):
        write_plan(target, artifacts)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "x.plan"]


def test_writer_refuses_a_broken_program(tmp_path, artifacts):
    manifest = plan_manifest()
    manifest["stages"][2]["inputs"]["latent"] = "12.0.samples"
    with pytest.raises(PlanError, match=r"stage sample_10 \(sample; node 10\) reads '12.0.samples', which no "
                                        "constant, runtime input or earlier stage provides"):
        write_plan(tmp_path / "x.plan", artifacts, manifest)
    manifest = plan_manifest()
    del manifest["stages"][1]["inputs"]["cond_context"]
    with pytest.raises(PlanError, match=r"stage sample_3 \(sample; node 3\) lacks cond_context"):
        write_plan(tmp_path / "x.plan", artifacts, manifest)
    assert not (tmp_path / "x.plan").exists()


# --- refusals, each before anything runs ---------------------------------------------------
def _rewrite(src: Path, dst: Path, *, edit_manifest=None, drop=(), add=None) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            if info.filename == "manifest.json" and edit_manifest is not None:
                manifest = json.loads(data)
                edit_manifest(manifest)
                data = json.dumps(manifest).encode()
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _tampered(plan: Path, dst: Path, member: str = "constants.safetensors") -> Path:
    start, end = PlanReader(plan).member_range(member)
    data = bytearray(plan.read_bytes())
    data[(start + end) // 2 if member == "weights.safetensors" else end - 1] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def _truncated_member(plan: Path, dst: Path) -> Path:
    """A valid zip whose weights member lost its second half (the manifest still lists the whole)."""
    with zipfile.ZipFile(plan) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info.filename, data[:len(data) // 2] if info.filename == "weights.safetensors" else data)
    return dst


def _members(plan: Path) -> dict:
    return PlanReader(plan).manifest.members


REFUSALS = {
    "not_a_zip": (lambda plan, dst: (dst.write_bytes(b"hello, not a plan"), dst)[1],
                  "invalid_plan: {dst} is not a kiln plan (not a zip file) (expected a .plan file written by "
                  "`kiln compile`; found a file starting with b'hell')"),
    "truncated": (lambda plan, dst: (dst.write_bytes(plan.read_bytes()[:len(plan.read_bytes()) // 2]), dst)[1],
                  "invalid_plan: {dst} is truncated or damaged: its zip directory cannot be read "
                  "(found File is not a zip file) (copy or download the plan again)"),
    "tampered": (_tampered,
                 "plan_member_mismatch: member constants.safetensors does not match the manifest's digest "
                 "(damaged or modified) (expected BLAKE3 {sha}...; found BLAKE3 "),
    "flipped_weight": (lambda plan, dst: _tampered(plan, dst, "weights.safetensors"),
                       "plan_member_mismatch: member weights.safetensors does not match the manifest's digest "
                       "(damaged or modified) (expected BLAKE3 {weights_sha}...; found BLAKE3 "),
    "truncated_member": (_truncated_member,
                         "plan_member_mismatch: member weights.safetensors does not match the manifest's digest "
                         "(damaged or modified) (expected BLAKE3 {weights_sha}...; found BLAKE3 "),
    "format_version": (lambda plan, dst: _rewrite(plan, dst, edit_manifest=lambda m: m.update(format_version=99)),
                       "plan_version_mismatch: plan format version 99 is not supported by this kiln "
                       "(expected format version 3; found format version 99) (recompile the plan with this kiln)"),
    "torch_version": (lambda plan, dst: _rewrite(plan, dst, edit_manifest=lambda m: m.update(torch_version="2.0.0")),
                      "plan_version_mismatch: the plan was compiled with another torch version (expected torch "
                      f"2.0.0; found torch {torch.__version__}) (recompile the plan with this torch)"),
    "missing_member": (lambda plan, dst: _rewrite(plan, dst, drop=["stages/module_8.pt2"]),
                       "invalid_plan: the plan is missing member stages/module_8.pt2 (expected every member its "
                       "manifest lists) (the file was altered: copy it again, or recompile it with kiln compile)"),
    "unlisted_member": (lambda plan, dst: _rewrite(plan, dst, add={"extra.bin": b"x"}),
                        "invalid_plan: the plan has a member its manifest does not list: extra.bin "
                        "(the file was altered: copy it again, or recompile it with kiln compile)"),
    "member_outside": (lambda plan, dst: _rewrite(plan, dst, edit_manifest=lambda m: m["members"].update(
                           {"../../outside.bin": "0" * 64})),
                       "invalid_plan: the manifest lists a member outside the plan (expected member names inside "
                       "the plan, such as stages/sample_3.pt2; found '../../outside.bin') (the file was altered: "
                       "recompile it with kiln compile)"),
    "device_unavailable": (lambda plan, dst: _rewrite(plan, dst,
                                                      edit_manifest=lambda m: m["target"].update(device="cuda")),
                           "plan_device_unavailable: the plan targets cuda but torch sees no such CUDA device "
                           "(expected cuda; found 0 CUDA device(s)) "
                           "(compile a plan for this machine with --device cpu)"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_exact_message_before_running(case, plan, tmp_path, artifact_cache, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make, message = REFUSALS[case]
    bad = make(plan, tmp_path / "bad.plan")
    shutil.rmtree(artifact_cache)   # the writer extracted the artifacts to list their constants
    expected = message.format(dst=bad, sha=_members(plan)["constants.safetensors"][:16],
                              weights_sha=_members(plan)["weights.safetensors"][:16])
    with pytest.raises(PlanError) as info:
        load_plan(bad)
    assert info.value.format().startswith(expected), info.value.format()
    assert any(word in info.value.problem.hint for word in ("compile", "copy")), "says what to do"
    out = tmp_path / "out"
    assert main(["run", str(bad), "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected) and "Traceback" not in err
    assert not out.exists() and not artifact_cache.exists()   # nothing ran, nothing was extracted


def test_compressed_member_refused(plan, tmp_path):
    bad = tmp_path / "bad.plan"
    with zipfile.ZipFile(plan) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    with pytest.raises(PlanError, match="are compressed; kiln plans store members uncompressed"):
        load_plan(bad)


# --- running: parity with the interpreter --------------------------------------------------
SAMPLE_CASES = {
    "euler": dict(sampler_name="euler", scheduler="normal", cfg=7.5),
    "dpmpp_2m_img2img": dict(sampler_name="dpmpp_2m", scheduler="karras", denoise=0.6, latent="image"),
    "euler_ancestral": dict(sampler_name="euler_ancestral", scheduler="simple", cfg=3.0),
    "euler_cfg_pp": dict(sampler_name="euler_cfg_pp", scheduler="normal", cfg=1.0),
    "dpm_2": dict(sampler_name="dpm_2", scheduler="karras"),
    "dpmpp_2m_sde": dict(sampler_name="dpmpp_2m_sde", scheduler="exponential", latent="image", denoise=0.8),
    "advanced": dict(sampler_name="euler", scheduler="normal", add_noise="enable",
                     start_at_step=1, end_at_step=3, return_with_leftover_noise="enable", latent="image"),
    "advanced_no_noise": dict(sampler_name="heun", scheduler="normal", add_noise="disable",
                              start_at_step=2, end_at_step=10, return_with_leftover_noise="disable", latent="image"),
    "noise_mask": dict(sampler_name="euler", scheduler="normal", latent="image", mask=True, denoise=0.7),
}


@pytest.mark.parametrize("case", list(SAMPLE_CASES))
def test_sample_stage_matches_the_interpreter(case, artifacts):
    opts = {"cfg": 5.0, "steps": 4, "seed": 42} | SAMPLE_CASES[case]
    if "add_noise" not in opts:
        opts.setdefault("denoise", 1.0)
    denoiser, _ = tiny_modules()
    model = EagerModel(denoiser.unet)
    cond, uncond = conditioning()
    g = torch.Generator().manual_seed(7)
    samples = torch.randn(2, 4, 6, 5, generator=g) * 3 if opts.get("latent") == "image" else torch.zeros(2, 4, 6, 5)
    latent = {"samples": samples}
    if opts.get("mask"):
        latent["noise_mask"] = (torch.rand(1, 1, 48, 40, generator=g) > 0.5).float()

    settings = {k: v for k, v in opts.items() if k not in ("latent", "mask", "seed", "cfg")}
    with torch.inference_mode():
        (expected,) = common_ksampler(RunContext(), model, opts["seed"], opts["cfg"], settings,
                                      [(cond, {})], [(uncond, {})], latent)
        sigmas, _ = ksampler_schedule(model.model_sampling, settings)

        weights = {fqn: denoiser.state_dict()[fqn] for fqn in constant_fqns(artifacts["denoiser"])}
        compiled = CompiledStage(artifacts["denoiser"], weights, torch.device("cpu"), "test")
        params = {k: v for k, v in opts.items() if k not in ("latent", "mask")} | {
            "prediction": "eps", "scale_factor": 0.18215, "latent_channels": 4}
        inputs = {"latent": "l", "cond_context": "c", "uncond_context": "u"}
        inputs |= {"noise_mask": "m"} if "mask" in opts else {}
        stage = StageSpec("s", "sample", ["3"], inputs, {"samples": "o"}, params, "stages/s.pt2")
        args = {"latent": samples, "cond_context": cond, "uncond_context": uncond} | (
            {"noise_mask": latent["noise_mask"]} if "mask" in opts else {})
        steps = []
        ctx = StageContext(torch.device("cpu"), {"s": compiled}, "unused", None,
                           on_step=lambda name, step, total: steps.append((name, step, total)))
        got = KINDS["sample"].run(stage, args, ctx)["samples"]
    # compared in sampler space (x scale_factor): raw latents are ~5x larger than what the sampler sees
    diff = ((got - expected["samples"]).abs().max() * 0.18215).item()
    print(f"{case}: max |plan - interpreter| = {diff:.3g} (sampler space; max |x| {got.abs().max() * 0.18215:.3g})")
    assert diff < 1e-5
    assert got.abs().max() > 0.1 and not torch.equal(got, samples)
    assert steps[-1] == ("s", len(sigmas) - 1, len(sigmas) - 1)


def test_cli_run_matches_interpreter_with_inputs_and_timings(plan, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(plan), "--seed", "5", "--set", "5.width=40", "--set", "3.sampler_name=euler_ancestral",
                 "-o", str(out), "--timings", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out / "plan_00001_.png")
    timings = captured.err
    assert timings.startswith("load ") and "stages: empty_latent_5 " in timings and "save_9 " in timings \
        and "process start to image " in timings
    with Image.open(out / "plan_00001_.png") as png:
        pixels = np.asarray(png)
        prompt = json.loads(png.text["prompt"])
    expected = eager_reference(seed=5, width=40, sampler_name="euler_ancestral")[0]
    assert pixels.shape == (48 // 8, 40 // 8, 3) == expected.shape   # the tiny "decode" does not upsample
    assert np.abs(pixels.astype(int) - expected).max() <= 1 and (pixels == expected).mean() > 0.99
    assert prompt["3"]["inputs"]["seed"] == 5 and prompt["5"]["inputs"]["width"] == 40
    assert prompt["10"]["inputs"] == WORKFLOW["10"]["inputs"]
    # the same defaults again: the next counter, and the workflow's own image; loading reports each artifact
    steps = []
    loaded = load_plan(plan, progress=lambda *step: steps.append(step))
    assert steps == [("sample_3", 0, 3), ("sample_10", 1, 3), ("module_8", 2, 3), ("plan", 3, 3)]
    assert loaded.compiled["sample_3"] is loaded.compiled["sample_10"]   # one loaded denoiser for both
    run = run_plan(loaded, output_dir=out)
    assert run.saved == [str(out / "plan_00002_.png")] and [t.name for t in run.timings][-1] == "save_9"
    with Image.open(run.saved[0]) as png:
        assert np.abs(np.asarray(png).astype(int) - eager_reference()[0]).max() <= 1
        assert json.loads(png.text["prompt"]) == WORKFLOW


@pytest.mark.parametrize("argv,message", [
    (["--set", "5.width=256"], "error: input '5.width': invalid_input: value outside the range the plan was "
                               "compiled for (expected 16..128; found 256) (recompile with a wider range, "
                               "e.g. --input NODE.INPUT=MIN..MAX)"),
    (["--set", "5.width=wide"], "error: input '5.width': invalid_input: value has the wrong type "
                                "(expected an integer; found 'wide')"),
    (["--set", "3.sampler_name=dpm_9"], "error: input '3.sampler_name': invalid_input: value not in list "
                                        "(expected one of 'euler', 'euler_ancestral', 'dpmpp_2m'; found 'dpm_9')"),
    (["--set", "6.text=a cat"], "error: input '6.text': invalid_input: the plan has no runtime input of this name "
                                "(expected one of 3.seed, 5.width, 3.sampler_name; found '6.text') "
                                "(declare it with `kiln compile --input NODE.INPUT`)"),
    (["--set", "width"], "error: invalid_input: --set needs NODE.INPUT=VALUE (expected e.g. --set 3.seed=7; "
                         "found 'width')"),
])
def test_bad_inputs_refused(plan, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["run", str(plan), "-o", str(out), "--quiet", *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not out.exists()


def test_bind_inputs_defaults_and_types(plan):
    manifest = PlanReader(plan).manifest
    assert bind_inputs(manifest, {}) == {"3.seed": 3, "5.width": 64, "3.sampler_name": "euler"}
    assert bind_inputs(manifest, {"3.seed": 2 ** 64 - 1, "5.width": 32.0})["3.seed"] == 2 ** 64 - 1
    with pytest.raises(PlanError, match="expected 0..18446744073709551615; found -1"):
        bind_inputs(manifest, {"3.seed": -1})
    with pytest.raises(PlanError, match="expected an integer; found True"):
        bind_inputs(manifest, {"5.width": True})


def test_inspect_shows_folding_stages_inputs_target_sizes(plan, capsys):
    assert main(["inspect", str(plan)]) == 0
    text = capsys.readouterr().out
    for line in ("target: cpu fp32 (aoti)",
                 "  3.seed: INT, default 3, range 0..18446744073709551615",
                 "  5.width: INT, default 64, range 16..128",
                 "  3.sampler_name: COMBO, default 'euler', one of euler, euler_ancestral, dpmpp_2m",
                 "  2. sample_3: sample, node 3",
                 "     reads 5.0.samples, const.6.0.0.cond, const.7.0.0.cond, in.3.seed, in.3.sampler_name; "
                 "writes 3.0.samples",
                 "     sampler_name=euler, scheduler=normal, steps=4, cfg=7.5, denoise=1.0, prediction=eps",
                 "folded (2 nodes):",
                 "  6 CLIPTextEncode -> const.6.0.0.cond",
                 "models left out (used only by folded nodes): tiny.safetensors (text encoder)"):
        assert line in text.splitlines(), line
    assert "artifact stages/sample_3.pt2 (" in text and "  weights.safetensors: " in text
    assert "cannot run here" not in text
