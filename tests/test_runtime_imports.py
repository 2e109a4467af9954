"""Loading and running a plan stays light: no kiln.compiler, kiln.nodes, diffusers, transformers,
and not even torch._inductor (the runtime drives AOTInductor's loader directly)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from test_plan_format import tiny_artifacts, write_plan

_CHILD = """
import json, sys
from kiln.cli import main
rc = main(["run", sys.argv[1], "-o", sys.argv[2], "--seed", "9", "--quiet", "--timings"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers")
               or m.startswith(("kiln.compiler", "kiln.nodes", "torch._inductor")))
print(json.dumps({"rc": rc, "heavy": heavy, "runtime": sorted(m for m in sys.modules if m.startswith("kiln."))}))
"""


def test_running_a_plan_imports_nothing_heavy(artifact_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    artifacts = tiny_artifacts(artifact_cache_dir)
    plan = write_plan(tmp_path / "x.plan", artifacts)
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(plan), str(out)], capture_output=True, text=True,
                           env=dict(os.environ), timeout=120)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0 and (out / "plan_00001_.png").is_file()
    assert report["heavy"] == [], report["heavy"]
    assert "kiln.runtime.plan" in report["runtime"] and "kiln.kernels.ksampler" in report["runtime"]
    assert "process start to image" in child.stderr
