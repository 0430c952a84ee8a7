"""Every benchmark script runs as `python benchmarks/<path>.py --help` from a checkout (they are scripts,
not a command of the package), and its default output goes under benchmarks/results/."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "benchmarks").rglob("*.py")
                 if p.name not in ("common.py",) and "__pycache__" not in p.parts)


@pytest.mark.slow  # one process per script
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_generate_benchmark_has_the_quick_mode():
    text = (ROOT / "benchmarks" / "bench_generate.py").read_text(encoding="utf-8")
    assert '"--quick"' in text
