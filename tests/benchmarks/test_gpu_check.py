"""benchmarks/checks/gpu_check.py in its CPU form (small shapes, same code path minus CUDA graphs), so the
script that proves the CUDA path on a GPU machine never rots between GPU runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.compile
def test_gpu_check_cpu_quick_passes(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    failed = {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-2000:])
    assert set(result["checks"]) == {"parity", "greedy", "sampling", "finetune", "torchrun", "speed"}
    assert result["checks"]["greedy"]["new_graphs_over_3_calls"] == 0
    assert all("gpt2mh_round_ms" in r for r in result["checks"]["speed"]["rows"])


@pytest.mark.slow  # spawns a process
def test_gpu_check_refuses_cuda_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checks" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
