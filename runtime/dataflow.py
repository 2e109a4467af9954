"""The checks a plan's stages must pass before anything runs (the writer runs them before
writing, the reader before loading): each stage fits its kind, carries an artifact exactly when
its kind is compiled, and reads only values that exist by the time it runs."""
from __future__ import annotations

from kiln.runtime.errors import PlanError
from kiln.runtime.kinds import kind_of
from kiln.runtime.manifest import Manifest


def check_dataflow(manifest: Manifest, constant_names) -> None:
    available = set(constant_names) | {spec.env for spec in manifest.inputs}
    for stage in manifest.stages:
        kind = kind_of(stage)
        if (stage.artifact is not None) != kind.compiled:
            raise PlanError("invalid_plan", f"{stage.describe()} is malformed",
                            expected="an artifact" if kind.compiled else "no artifact", found=repr(stage.artifact))
        kind.check(stage)
        for env_name in stage.inputs.values():
            if env_name not in available:
                raise PlanError("invalid_plan", f"{stage.describe()} reads {env_name!r}, which no constant, "
                                "runtime input or earlier stage provides")
        available.update(stage.outputs.values())
