"""The editor's (UI) format and ComfyUI PNGs: converted as ComfyUI's front end converts them,
giving the images of the matching API workflows; bad UI files told as API ones are."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from kiln.api import run_workflow
from kiln.cli import main
from kiln.compiler.ui_workflow import ui_to_api
from kiln.compiler.workflow import parse_workflow
from kiln.kernels.errors import KilnError
from ui_files import UiWorkflow
from workflows import hires_fix, img2img, render, txt2img, variant


def _image(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_txt2img_ui_file_gives_the_api_workflows_image(models_dir, input_dir, tmp_path):
    api = txt2img()
    ui = UiWorkflow(api)
    ui.add(50, "Note", [], [], widgets=["remember the fox"])
    ui.add(51, "PreviewImage", [{"name": "images", "type": "IMAGE", "link": None}], [], mode=2)   # muted
    ui.connect(8, 0, 51, "images")
    converted = ui_to_api(ui.data())
    assert set(converted) == set(api)
    assert converted["3"]["inputs"]["seed"] == 3 and converted["3"]["_meta"]["title"] == "My Sampler"
    assert converted["8"]["_meta"]["title"] == "VAE Decode"
    assert np.array_equal(render(ui.data(), models_dir, input_dir, tmp_path / "ui"),
                          render(api, models_dir, input_dir, tmp_path / "api"))


def test_hires_fix_with_a_reroute_a_primitive_seed_and_a_bypassed_node(models_dir, input_dir, tmp_path):
    api = hires_fix()
    ui = UiWorkflow(api)
    ui.reroute(60, 13, "vae")                       # the VAE into the second encode through a Reroute
    ui.primitive(61, 14, "seed", 99)                # the second sampler's seed from a PrimitiveNode
    ui.bypassed(62, "ImageScaleBy", 12, "image", ["nearest-exact", 2.0])   # bypassed: upscale -> resize
    converted = ui_to_api(ui.data())
    assert set(converted) == set(api)
    assert converted["13"]["inputs"]["vae"] == ["4", 2] and converted["12"]["inputs"]["image"] == ["11", 0]
    assert converted["14"]["inputs"]["seed"] == 99
    expected = variant(api, "14", seed=99)
    assert np.array_equal(render(ui.data(), models_dir, input_dir, tmp_path / "ui"),
                          render(expected, models_dir, input_dir, tmp_path / "api"))


def test_img2img_ui_file_skips_the_upload_widget(models_dir, input_dir, tmp_path):
    api = img2img()
    ui = UiWorkflow(api)
    assert ui.nodes[10]["widgets_values"] == ["input.png", "image"]
    assert np.array_equal(render(ui.data(), models_dir, input_dir, tmp_path / "ui"),
                          render(api, models_dir, input_dir, tmp_path / "api"))


def test_kiln_convert_writes_the_api_form(tmp_path):
    ui = UiWorkflow(txt2img())
    ui.primitive(61, 3, "seed", 11)
    source = tmp_path / "ui.json"
    source.write_text(json.dumps(ui.data()))
    assert main(["convert", str(source), "-o", str(tmp_path / "api.json")]) == 0
    written = json.loads((tmp_path / "api.json").read_text())
    assert written["3"]["inputs"]["seed"] == 11 and written["3"]["inputs"]["model"] == ["4", 0]
    assert parse_workflow(written).nodes.keys() == txt2img().keys()


def test_a_widget_list_that_does_not_fit_names_the_node(tmp_path, capsys):
    ui = UiWorkflow(txt2img())
    ui.nodes[5]["widgets_values"].append(7)
    ui.nodes[5]["title"] = "Canvas"
    source = tmp_path / "ui.json"
    source.write_text(json.dumps(ui.data()))
    assert main(["run", str(source), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert 'node 5 (EmptyLatentImage "Canvas")' in err and "widgets_values has 4 values" in err
    assert "expected width, height, batch_size" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_node_in_a_ui_file_is_named_with_its_title(tmp_path):
    data = UiWorkflow(txt2img()).data()
    data["nodes"].append({"id": 70, "type": "FancyCustomNode", "mode": 0, "title": "My custom thing",
                          "inputs": [], "outputs": [], "widgets_values": [1]})
    with pytest.raises(KilnError) as failure:
        run_workflow(data, output_dir=tmp_path)
    [problem] = [p for p in failure.value.problems if p.node_id == "70"]
    assert (problem.code, problem.title, problem.class_type) == ("missing_node_type", "My custom thing",
                                                                 "FancyCustomNode")


def test_a_legacy_group_node_is_refused_with_what_to_do(tmp_path):
    data = UiWorkflow(txt2img()).data()
    data["nodes"].append({"id": 71, "type": "workflow>Upscale group", "mode": 0, "inputs": [], "outputs": [],
                          "widgets_values": []})
    with pytest.raises(KilnError) as failure:
        parse_workflow(data)
    [problem] = failure.value.problems
    assert problem.node_id == "71" and "group node" in problem.message and "subgraph" in problem.expected


def test_a_png_runs_again_to_the_same_image(models_dir, input_dir, tmp_path):
    first = run_workflow(txt2img(seed=21), models=models_dir, input_dir=input_dir, output_dir=tmp_path / "a")
    again = run_workflow(first.saved[0], models=models_dir, input_dir=input_dir, output_dir=tmp_path / "b")
    assert np.array_equal(_image(again.saved[0]), _image(first.saved[0]))
    # a PNG with only the editor's graph (the workflow chunk) runs from that
    ui_only = tmp_path / "ui-only.png"
    info = PngInfo()
    info.add_text("workflow", json.dumps(UiWorkflow(txt2img(seed=21)).data()))
    Image.new("RGB", (8, 8)).save(ui_only, pnginfo=info)
    third = run_workflow(ui_only, models=models_dir, input_dir=input_dir, output_dir=tmp_path / "c")
    assert np.array_equal(_image(third.saved[0]), _image(first.saved[0]))
    # and a UI file's run writes the editor's graph next to the prompt, as ComfyUI does
    assert json.loads(Image.open(third.saved[0]).text["workflow"])["nodes"]
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(KilnError, match="holds no workflow"):
        run_workflow(tmp_path / "plain.png", output_dir=tmp_path / "d")


def test_a_subgraph_instance_is_expanded(models_dir, input_dir, tmp_path):
    """The decode + save as a subgraph (the editor's definitions.subgraphs): its inner nodes get
    ids ``<instance>:<inner>`` and read the instance's inputs."""
    api = txt2img()
    data = UiWorkflow({k: v for k, v in api.items() if k not in ("8", "9")}).data()
    inner = UiWorkflow({"1": {"class_type": "VAEDecode", "inputs": {}},
                        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t2i", "images": ["1", 0]}}})
    definition = inner.data()
    definition.update(id="decode-and-save", name="Decode and save")
    definition["links"] += [[90, -10, 0, 1, 0, "LATENT"], [91, -10, 1, 1, 1, "VAE"]]
    decode = next(node for node in definition["nodes"] if node["id"] == 1)
    decode["inputs"][0]["link"], decode["inputs"][1]["link"] = 90, 91
    data["definitions"] = {"subgraphs": [definition]}
    data["nodes"].append({"id": 80, "type": "decode-and-save", "mode": 0, "widgets_values": [],
                          "inputs": [{"name": "samples", "type": "LATENT", "link": 101},
                                     {"name": "vae", "type": "VAE", "link": 102}], "outputs": []})
    data["links"] += [[101, 3, 0, 80, 0, "LATENT"], [102, 4, 2, 80, 1, "VAE"]]
    converted = ui_to_api(data)
    assert converted["80:1"]["inputs"] == {"samples": ["3", 0], "vae": ["4", 2]}
    assert converted["80:2"]["inputs"]["images"] == ["80:1", 0]
    assert np.array_equal(render(data, models_dir, input_dir, tmp_path / "ui"),
                          render(api, models_dir, input_dir, tmp_path / "api"))


@pytest.mark.parametrize("mode", ["fixed", "increment", "randomize"])
def test_control_after_generate_applies_between_runs(mode, models_dir, input_dir, tmp_path, capsys):
    """``kiln run ui.json --runs 3``: the first run uses the saved seed, then each seed's control
    changes it as ComfyUI's Queue does (the prompt chunk of each PNG holds the seed it ran)."""
    ui = UiWorkflow(txt2img(seed=40))
    ui.nodes[3]["widgets_values"][1] = mode
    source = tmp_path / "ui.json"
    source.write_text(json.dumps(ui.data()))
    assert main(["run", str(source), "--runs", "3", "--quiet", "--models", str(models_dir),
                 "-o", str(tmp_path / "out")]) == 0
    saved = capsys.readouterr().out.split()
    seeds = [json.loads(Image.open(path).text["prompt"])["3"]["inputs"]["seed"] for path in saved]
    assert seeds[0] == 40
    if mode == "fixed":
        assert seeds == [40, 40, 40] and np.array_equal(_image(saved[0]), _image(saved[2]))
    elif mode == "increment":
        assert seeds == [40, 41, 42]
    else:
        assert len(set(seeds)) == 3 and all(0 <= s < 2 ** 50 for s in seeds)
    assert json.loads(Image.open(saved[0]).text["prompt"])["3"]["_meta"]["control_after_generate"] == {"seed": mode}
