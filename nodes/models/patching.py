"""Weight patches a model handle carries, as ComfyUI's ``ModelPatcher`` does: a loader adds
patches to a copy of the handle, and the weights are computed once, from the unpatched module,
when the handle is first used. A chain of LoRA loaders therefore rounds each weight once, and
the models in the middle of the chain never hold weights of their own."""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from kiln.kernels.lora import Adapter, PatchList, patched_weight


class Tensors(nn.Module):
    """Tensors a model reads besides its weights (IP-Adapter image embeds, ControlNet hints),
    held as buffers: a plan's export then finds them in the module tree and stores them as
    named weights instead of baking copies into the compiled code."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)


class ShallowCopy:
    """A copy of a module tree made on demand along the paths that change: ``module(path)`` is a
    copy of that submodule (and of its parents) the caller may change; everything else is shared
    with the original, which stays untouched."""

    def __init__(self, root: nn.Module):
        self._original = root
        self._copies: dict[tuple[str, ...], nn.Module] = {}

    def _copied(self, path: tuple[str, ...]) -> nn.Module:
        if path not in self._copies:
            if path:
                parent = self._copied(path[:-1])
                clone = copy.copy(parent._modules[path[-1]])
                parent._modules[path[-1]] = clone
            else:
                clone = copy.copy(self._original)
            clone._modules = dict(clone._modules)
            clone._parameters = dict(clone._parameters)
            self._copies[path] = clone
        return self._copies[path]

    def module(self, path: str) -> nn.Module:
        return self._copied(tuple(path.split(".")) if path else ())

    @property
    def root(self) -> nn.Module:
        return self._copied(())


def with_parameters(root: nn.Module, new: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``root`` sharing every submodule and tensor except the parameters named in
    ``new`` (dotted names), which the copy holds instead; ``root`` is left untouched."""
    tree = ShallowCopy(root)
    for name, tensor in new.items():
        path, _, leaf = name.rpartition(".")
        tree.module(path)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    return tree.root


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
