"""ComfyUI's models folder layout and extra_model_paths.yaml."""
from __future__ import annotations

import pytest

from kiln.nodes.folders import ModelFolders, ModelNotFound


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_models_dir_layout_lists_recursively_and_resolves(tmp_path):
    touch(tmp_path / "checkpoints" / "sd15" / "a.safetensors")
    touch(tmp_path / "checkpoints" / "b.ckpt")
    touch(tmp_path / "checkpoints" / "notes.txt")
    folders = ModelFolders.from_models_dir(tmp_path)
    assert folders.list("checkpoints") == ["b.ckpt", "sd15/a.safetensors"]
    assert folders.resolve("checkpoints", "sd15/a.safetensors") == tmp_path / "checkpoints" / "sd15" / "a.safetensors"


def test_missing_file_names_folders_searched_and_files_there(tmp_path):
    touch(tmp_path / "vae" / "kl-f8.safetensors")
    folders = ModelFolders.from_models_dir(tmp_path)
    with pytest.raises(ModelNotFound) as info:
        folders.resolve("vae", "sdxl_vae.safetensors")
    message = str(info.value)
    assert str(tmp_path / "vae") in message and "files there: kl-f8.safetensors" in message


def test_extra_model_paths_yaml(tmp_path):
    webui = tmp_path / "webui"
    touch(webui / "models" / "Stable-diffusion" / "dreamshaper.safetensors")
    touch(webui / "models" / "ESRGAN" / "4x.pth")
    touch(webui / "models" / "RealESRGAN" / "x2.pth")
    touch(tmp_path / "abs" / "unets" / "u.safetensors")
    yaml_file = tmp_path / "comfy" / "extra_model_paths.yaml"
    yaml_file.parent.mkdir()
    yaml_file.write_text(f"""
a111:
    base_path: ../webui/
    checkpoints: models/Stable-diffusion
    upscale_models: |
        models/ESRGAN
        models/RealESRGAN
other:
    unet: {tmp_path / 'abs' / 'unets'}
""")
    folders = ModelFolders.from_models_dir(tmp_path / "comfy" / "models")   # yaml found in the ComfyUI root
    assert folders.list("checkpoints") == ["dreamshaper.safetensors"]
    assert folders.list("upscale_models") == ["4x.pth", "x2.pth"]
    assert folders.list("diffusion_models") == ["u.safetensors"]   # legacy "unet" name
    explicit = ModelFolders.from_models_dir(None, yaml_file)
    assert explicit.resolve("upscale_models", "x2.pth").parent.name == "RealESRGAN"


def test_bad_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "extra_model_paths.yaml"
    bad.write_text("- just a list\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        ModelFolders.from_models_dir(None, bad)
