"""OpenMP waits passively by default (bench/bench_omp.py measured why), unless the user chose."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def openmp_settings(module, **env):
    """What OpenMP itself reports (OMP_DISPLAY_ENV) once `module` has loaded torch."""
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                            env={**base, "OMP_DISPLAY_ENV": "VERBOSE", **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    if "GOMP_SPINCOUNT" not in result.stderr:
        pytest.skip("torch's OpenMP is not GNU libgomp: it does not report its spin count")
    return {k.strip(): v.strip(" '") for k, _, v in (line.partition("=") for line in result.stderr.splitlines())
            if k.strip() in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}


@pytest.mark.parametrize("script", ["train", "finetune", "evaluate", "sample", "export_hf"])
def test_scripts_start_openmp_passive(script):
    # unset, OpenMP still reports PASSIVE but spins 300,000 times first; PASSIVE spins 0 times
    assert openmp_settings(script) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}


def test_the_users_choice_wins():
    assert openmp_settings("train", OMP_WAIT_POLICY="ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"
