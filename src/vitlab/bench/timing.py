"""Timing primitives of the benchmark: interleaved A/B repetitions with medians, the matmul peak that model FLOP
utilisation (MFU) is measured against, peak memory, and a description of the machine for the JSON record."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating order (A B, B A, A B, ...).

    On a shared machine, load that comes and goes then hits every contender alike; the order flips each round so
    neither side always runs first (and inherits warm caches or a boosted clock).
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def matmul_peak(dtype: torch.dtype, *, n: int = 2048, reps: int = 7, device: torch.device | str = "cpu") -> float:
    """Achieved FLOP/s of a plain (n x n) @ (n x n) matmul of ``dtype``: the denominator of MFU.

    The best of ``reps`` calls (after one warm-up) is taken: it is the machine's attainable rate, which a
    throughput can then be compared against whatever else the machine is doing at the time.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def mfu(flops_per_call: float, seconds_per_call: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the measured matmul peak."""
    return flops_per_call / seconds_per_call / peak_flops


# ----------------------------------------------------------------------------------------------------- memory
def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ``clear_refs`` = 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM, which :func:`reset_peak_rss` resets; else ``ru_maxrss``)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on: device, threads, library versions, load average."""
    import importlib.metadata as md

    info: dict = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu_model"] = name.group(1).strip() if name else platform.processor()
        flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        if flags:
            info["cpu_flags"] = sorted({f for f in flags.group(1).split() if f.startswith(("avx512", "amx"))})
    except OSError:
        info["cpu_model"] = platform.processor()
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    versions = {}
    for pkg in ("vitlab", "torch", "timm", "onnx", "onnxruntime", "torchvision"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info["versions"] = versions
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
