"""Weight patches a model handle carries, as ComfyUI's ``ModelPatcher`` does: a loader adds
patches to a copy of the handle, and the weights are computed once, from the unpatched module,
when the handle is first used. A chain of LoRA loaders therefore rounds each weight once, and
the models in the middle of the chain never hold weights of their own."""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from kiln.nodes.models.lora import Adapter, PatchList, patched_weight


def with_parameters(root: nn.Module, new: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``root`` sharing every submodule and tensor except the parameters named in
    ``new`` (dotted names), which the copy holds instead; ``root`` is left untouched."""
    copies: dict[tuple[str, ...], nn.Module] = {}

    def copied(path: tuple[str, ...]) -> nn.Module:
        if path not in copies:
            if path:
                parent = copied(path[:-1])
                clone = copy.copy(parent._modules[path[-1]])
                parent._modules[path[-1]] = clone
            else:
                clone = copy.copy(root)
            clone._modules = dict(clone._modules)
            clone._parameters = dict(clone._parameters)
            copies[path] = clone
        return copies[path]

    result = copied(())
    for name, tensor in new.items():
        *path, leaf = name.split(".")
        copied(tuple(path))._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return result


class PatchedWeights:
    """One module tree (unpatched) and the patches on its weights, keyed by ComfyUI's
    state-dict names (``targets`` maps those to the module's parameter names)."""

    def __init__(self, base: nn.Module, targets: dict[str, str], stored_dtype: torch.dtype | None = None,
                 patches: dict[str, PatchList] | None = None):
        self.base = base
        self.targets = targets
        self.stored_dtype = stored_dtype
        self.patches = patches or {}
        self._module = None if self.patches else base
        self._lock = threading.Lock()

    def add(self, patches: dict[str, Adapter], strength: float) -> tuple["PatchedWeights", set[str]]:
        """A copy with ``patches`` appended at ``strength`` (ComfyUI's ``add_patches``), and the
        keys it took: those naming one of this module's weights."""
        taken = {key for key in patches if key in self.targets}
        if not taken:
            return self, taken
        for key in taken:
            patches[key].check_fits(self.base.get_parameter(self.targets[key]).shape, key)
        merged = dict(self.patches)
        for key in taken:
            merged[key] = merged.get(key, ()) + ((strength, patches[key]),)
        return PatchedWeights(self.base, self.targets, self.stored_dtype, merged), taken

    def module(self) -> nn.Module:
        """The module with every patch applied (computed on first use, then kept)."""
        with self._lock:
            if self._module is None:
                new = {}
                for key, patch_list in self.patches.items():
                    name = self.targets[key]
                    new[name] = patched_weight(self.base.get_parameter(name), patch_list, key, self.stored_dtype)
                self._module = with_parameters(self.base, new)
            return self._module
