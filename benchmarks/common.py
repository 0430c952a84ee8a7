"""Shared benchmark harness: synced timing, peak RSS, read bandwidth, machine facts, JSON out.

Every benchmark is a script that writes one JSON file; `report.py` turns those into a plot and a
table. Nothing here asserts a time: the numbers are for reading, ratios are what carry meaning on
a shared, noisy machine."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1 << 30


# ---- timing -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, result) of fn(), with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- memory -----------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size now."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM (resettable, see `reset_peak_rss`), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024  # macOS reports bytes, Linux KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > clear_refs`); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gpu_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


# ---- bandwidth --------------------------------------------------------------------------------
def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Best read bandwidth in bytes/s: `torch.sum` over a `gib` GiB float32 tensor, `repeats` times.

    A reduction reads every byte once and writes nothing, like a decode step reading its weights.
    The tensor is filled (pages touched) before timing; the best run is the least disturbed one."""
    x = torch.ones(int(gib * GIB) // 4, dtype=torch.float32, device=device)
    x.sum()  # warm-up: kernels, thread pool
    n = repeats if device.type == "cpu" else repeats * 10  # a GPU reads 1 GiB in well under 1 ms
    best = float("inf")
    for _ in range(n):
        dt, _ = timed(lambda: x.sum(), device)
        best = min(best, dt)
    return x.numel() * x.element_size() / best


# ---- machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "gpt2mh": package_version("gpt2mh"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "device_name": cpu_model(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, cuda=torch.version.cuda, gpu_memory_bytes=p.total_memory,
                    gpu_capability=f"{p.major}.{p.minor}")
    return info


# ---- output -----------------------------------------------------------------------------------
def write_json(path: str | Path, obj) -> Path:
    """Write atomically (a `.tmp` beside it, then rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_child(script: str | Path, args: list[str], timeout: float | None = None) -> dict:
    """Run `python script *args --child-out FILE` in a fresh process and return the JSON it wrote.

    A fresh process is the only clean way to read one system's peak RSS: a process's peak
    never goes down, and every model loaded before would count in it."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "child.json"
        cmd = [sys.executable, str(script), *args, "--child-out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise RuntimeError(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
