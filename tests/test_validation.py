"""One test per validation error class: the message names node, class_type, input, expected, found."""
from __future__ import annotations

import json

import pytest

from kiln.cli import main
from kiln.kernels.errors import KilnError
from kiln.compiler.validate import validate
from kiln.compiler.workflow import parse_workflow
from kiln.nodes.folders import ModelFolders
from workflows import txt2img, variant


def problems(workflow, models_dir=None, input_dir=None):
    folders = ModelFolders.from_models_dir(models_dir)
    with pytest.raises(KilnError) as info:
        validate(parse_workflow(workflow), folders, input_dir)
    return [p.format() for p in info.value.problems]


def parse_error(text) -> str:
    with pytest.raises(KilnError) as info:
        parse_workflow(text)
    return str(info.value)


def test_valid_workflow_passes_and_converts_constants(models_dir):
    wf = variant(txt2img(), "3", steps="5", cfg=7)
    graph = validate(parse_workflow(wf), ModelFolders.from_models_dir(models_dir))
    assert graph.nodes["3"].inputs["steps"] == 5 and isinstance(graph.nodes["3"].inputs["cfg"], float)


def test_width_not_multiple_of_8_is_accepted_like_comfyui(models_dir):
    validate(parse_workflow(variant(txt2img(), "5", width=100)), ModelFolders.from_models_dir(models_dir))


def test_not_json():
    assert "is not valid JSON" in parse_error('{"3": {')


def test_not_a_workflow():
    message = parse_error("[1, 2]")
    assert "is not a workflow" in message and "found a JSON list" in message


def test_an_empty_workflow_has_no_outputs_in_comfyuis_words():
    for text in ("{}", json.dumps({"nodes": [], "links": [], "version": 0.4})):
        with pytest.raises(KilnError) as info:
            parse_workflow(text)
        [problem] = info.value.problems
        assert (problem.code, problem.message) == ("prompt_no_outputs", "Prompt has no outputs")


def test_missing_class_type():
    message = parse_error(json.dumps({"1": {"inputs": {}}}))
    assert "node 1" in message and "missing the class_type" in message


def test_bad_link_shape():
    message = parse_error(json.dumps({"1": {"class_type": "VAEDecode", "inputs": {"samples": ["3"]}}}))
    assert "bad_linked_input" in message and "input 'samples'" in message and "['3']" in message


def test_unknown_node_type_with_did_you_mean(models_dir):
    wf = txt2img()
    wf["3"]["class_type"] = "KSampler2"
    [message] = problems(wf, models_dir)
    assert message.startswith("node 3 (KSampler2 \"My Sampler\"): missing_node_type")
    assert "did you mean 'KSampler'" in message


def test_required_input_missing(models_dir):
    wf = txt2img()
    del wf["3"]["inputs"]["steps"]
    [message] = problems(wf, models_dir)
    assert message.startswith("node 3 (KSampler \"My Sampler\"), input 'steps': required_input_missing")
    assert "expected a INT value (default 20)" in message


def test_link_to_missing_node_and_slot(models_dir):
    wf = variant(txt2img(), "8", samples=["42", 0], vae=["4", 7])
    found = problems(wf, models_dir)
    assert any("input 'samples': bad_linked_input: links to node '42'" in m for m in found)
    assert any("input 'vae': bad_linked_input: links to output slot 7 of node 4" in m for m in found)


def test_cycle(models_dir):
    """A link that closes a cycle and has the wrong type: both told at once."""
    cycle, mismatch = problems(variant(txt2img(), "8", samples=["8", 0]), models_dir)
    assert cycle == "dependency_cycle: the workflow has a cycle: 8 -> 8"
    assert "node 8 (VAEDecode), input 'samples': return_type_mismatch" in mismatch
    assert "expected LATENT; found IMAGE" in mismatch


def test_return_type_mismatch(models_dir):
    wf = variant(txt2img(), "9", images=["3", 0])
    [message] = problems(wf, models_dir)
    assert "node 9 (SaveImage), input 'images': return_type_mismatch" in message
    assert "expected IMAGE; found LATENT" in message


def test_value_out_of_range(models_dir):
    found = problems(variant(txt2img(), "3", steps=0, cfg=250.0), models_dir)
    assert any("input 'steps': value_smaller_than_min" in m and "found 0" in m for m in found)
    assert any("input 'cfg': value_bigger_than_max" in m and "found 250.0" in m for m in found)


def test_value_not_in_list_with_hint(models_dir):
    [message] = problems(variant(txt2img(), "3", sampler_name="dpmpp2m"), models_dir)
    assert "input 'sampler_name': value_not_in_list" in message
    assert "found 'dpmpp2m'" in message and "did you mean 'dpmpp_2m'?" in message


def test_invalid_input_type(models_dir):
    [message] = problems(variant(txt2img(), "3", steps="many"), models_dir)
    assert "input 'steps': invalid_input_type" in message and "expected INT; found 'many'" in message


def test_constant_where_a_link_is_needed(models_dir):
    [message] = problems(variant(txt2img(), "3", model="v1-5.safetensors"), models_dir)
    assert "input 'model': invalid_input_type" in message and "MODEL output" in message


def test_missing_model_file_names_folders_and_files(models_dir):
    [message] = problems(variant(txt2img(), "4", ckpt_name="v1-5-pruned.safetensors"), models_dir)
    assert "input 'ckpt_name': value_not_in_list: checkpoints file not found" in message
    assert str(models_dir / "checkpoints") in message and "'tiny-sd15.safetensors'" in message


def test_missing_input_image(tmp_path, models_dir):
    wf = txt2img()
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
    wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    wf["3"]["inputs"]["latent_image"] = ["11", 0]
    [message] = problems(wf, models_dir, tmp_path)
    assert "node 10 (LoadImage), input 'image': value_not_in_list: input file not found" in message


def test_no_output_node(models_dir):
    wf = txt2img()
    del wf["9"]
    [message] = problems(wf, models_dir)
    assert "prompt_no_outputs" in message and "SaveImage" in message


def test_every_error_is_reported_at_once(models_dir):
    wf = variant(txt2img(), "3", steps=0, sampler_name="nope", scheduler="sometimes")
    wf["5"]["inputs"]["batch_size"] = 0
    assert len(problems(wf, models_dir)) == 4


def test_cli_prints_all_errors_exits_2_and_writes_nothing(tmp_path, models_dir, capsys):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(variant(txt2img(), "3", steps=0, sampler_name="nope")))
    out = tmp_path / "out"
    assert main(["run", str(path), "--models", str(models_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and "Traceback" not in err
    assert not out.exists()


def test_cli_missing_workflow_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_cuda_on_a_machine_without_one(tmp_path, models_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this check is for machines without CUDA")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(txt2img()))
    assert main(["run", str(path), "--models", str(models_dir), "-o", str(tmp_path / "o"),
                 "--device", "cuda", "--dtype", "fp16"]) == 2
    assert "CUDA was requested but torch sees no CUDA device" in capsys.readouterr().err


def test_cli_run_prints_saved_files_and_time_per_node(tmp_path, models_dir, capsys):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(txt2img(steps=2)))
    assert main(["run", str(path), "--models", str(models_dir), "-o", str(tmp_path / "o"), "--seed", "9",
                 "--set", "6.text=a blue bird"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().endswith("t2i_00001_.png")
    assert "time per node: 4 CheckpointLoaderSimple" in captured.err and "3 KSampler" in captured.err
    from PIL import Image

    prompt = json.loads(Image.open(captured.out.strip()).text["prompt"])
    assert prompt["3"]["inputs"]["seed"] == 9 and prompt["6"]["inputs"]["text"] == "a blue bird"


def test_node_failure_is_reported_with_the_node(tmp_path, models_dir, capsys):
    bad = models_dir.parent / "broken_models"
    (bad / "checkpoints").mkdir(parents=True, exist_ok=True)
    (bad / "checkpoints" / "broken.safetensors").write_bytes(b"not a safetensors file")
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(txt2img("broken.safetensors")))
    assert main(["run", str(path), "--models", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: node 4 (CheckpointLoaderSimple), input") or \
        err.startswith("error: node 4 (CheckpointLoaderSimple): exception_during_execution")
    assert "broken.safetensors" in err and "Traceback" not in err
