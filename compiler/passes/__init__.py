"""Compiler passes: each a pure function ``Compilation -> Compilation`` with its guarantees in its
docstring. ``kiln.compiler.pipeline.PASSES`` lists them in the order they run."""
from kiln.compiler.passes.dead_nodes import dead_nodes
from kiln.compiler.passes.fold_constants import fold_constants
from kiln.compiler.passes.fuse import fuse_stages
from kiln.compiler.passes.merge_identical import merge_identical
from kiln.compiler.passes.modules import build_modules
from kiln.compiler.passes.partition import partition_stages
from kiln.compiler.passes.runtime_inputs import runtime_inputs
from kiln.compiler.passes.runtime_loras import runtime_loras

__all__ = ["build_modules", "dead_nodes", "fold_constants", "fuse_stages", "merge_identical",
           "partition_stages", "runtime_inputs", "runtime_loras"]
