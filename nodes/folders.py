"""ComfyUI's model folder layout: ``<models>/<kind>/...`` plus ``extra_model_paths.yaml``.

A workflow names model files relative to a kind's folder ("sd15/model.safetensors"); this
module lists what each kind's folders hold and resolves a name to a path, the way
ComfyUI's ``folder_paths`` does, so a ComfyUI install can be pointed at unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# ComfyUI's folder_paths.supported_pt_extensions ('.pkl' left out: kiln never unpickles).
MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".sft")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

MODEL_KINDS = ("checkpoints", "vae", "upscale_models", "loras", "clip_vision", "ipadapter",
               "embeddings", "controlnet", "text_encoders", "diffusion_models")
# Legacy names that extra_model_paths.yaml files still use.
_KIND_ALIASES = {"unet": "diffusion_models", "clip": "text_encoders", "t2i_adapter": "controlnet"}


class ModelNotFound(LookupError):
    """A workflow names a file that none of the kind's folders hold."""

    def __init__(self, kind: str, name: str, searched: list[Path], available: list[str]):
        self.kind, self.name, self.searched, self.available = kind, name, searched, available
        where = ", ".join(str(p) for p in searched) or "(no folder configured)"
        there = ", ".join(available[:10]) + (" ..." if len(available) > 10 else "") if available else "none"
        super().__init__(f"{kind} file {name!r} not found; searched {where}; files there: {there}")


@dataclass
class ModelFolders:
    """Search paths per model kind, in priority order."""

    paths: dict[str, list[Path]] = field(default_factory=dict)

    @classmethod
    def from_models_dir(cls, models_dir: str | os.PathLike | None,
                        extra_model_paths: str | os.PathLike | None = None) -> "ModelFolders":
        """``<models>/<kind>`` for every kind, then the entries of ``extra_model_paths.yaml``.

        Without an explicit yaml, one sitting in the ComfyUI root (the models dir's parent) is used,
        as ComfyUI itself would.
        """
        folders = cls()
        if models_dir is not None:
            root = Path(models_dir).expanduser()
            for kind in MODEL_KINDS:
                folders.add(kind, root / kind)
            if extra_model_paths is None and (root.parent / "extra_model_paths.yaml").is_file():
                extra_model_paths = root.parent / "extra_model_paths.yaml"
        if extra_model_paths is not None:
            folders.load_yaml(Path(extra_model_paths))
        return folders

    def add(self, kind: str, path: Path) -> None:
        kind = _KIND_ALIASES.get(kind, kind)
        entries = self.paths.setdefault(kind, [])
        if path not in entries:
            entries.append(path)

    def load_yaml(self, path: Path) -> None:
        """ComfyUI's extra_model_paths.yaml: sections with ``base_path`` and kind -> path(s)."""
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of sections, found {type(config).__name__}")
        for section, entries in config.items():
            if not isinstance(entries, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping")
            base = Path(os.path.expandvars(str(entries.get("base_path", "")))).expanduser()
            if not base.is_absolute():
                base = path.parent / base
            for kind, value in entries.items():
                if kind in ("base_path", "is_default") or value is None:
                    continue
                for line in str(value).splitlines():
                    line = line.strip()
                    if line:
                        folder = Path(os.path.expandvars(line)).expanduser()
                        self.add(kind, folder if folder.is_absolute() else base / folder)

    def searched(self, kind: str) -> list[Path]:
        return list(self.paths.get(_KIND_ALIASES.get(kind, kind), []))

    def list(self, kind: str, extensions: tuple[str, ...] = MODEL_EXTENSIONS) -> list[str]:
        """Every file name (relative, '/'-separated, sorted) the kind's folders hold."""
        names: set[str] = set()
        for folder in self.searched(kind):
            names.update(list_files(folder, extensions))
        return sorted(names)

    def resolve(self, kind: str, name: str) -> Path:
        for folder in self.searched(kind):
            candidate = folder / name
            if candidate.is_file():
                return candidate
        raise ModelNotFound(kind, name, self.searched(kind), self.list(kind))


def list_files(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    """Files under ``folder`` (recursively) with one of ``extensions``, as relative names."""
    if not folder.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.lower().endswith(extensions):
                found.append(Path(dirpath, filename).relative_to(folder).as_posix())
    return sorted(found)
