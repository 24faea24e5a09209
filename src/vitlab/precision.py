"""Numeric precision, in one place: the vocabulary every command and preset takes (``auto``, ``fp32``, ``bf16``),
what ``auto`` resolves to on this machine, and the autocast context a resolved precision means.

bf16 pays only where the hardware computes it: CUDA GPUs with bf16 support, and CPUs with AVX512-BF16 or AMX (AMD
Zen 4 and later, Intel Cooper Lake, Sapphire Rapids and later). Elsewhere (AVX2 CPUs such as Intel before Sapphire
Rapids and AMD Zen 2/3, most laptops and cloud VMs) PyTorch emulates bf16 with conversions around fp32 arithmetic,
and a training step runs many times slower than in fp32 (docs/speed.md, "Precision by CPU class"). So ``auto``, the
default everywhere, is bf16 where it is native and fp32 elsewhere; an explicit ``bf16`` still runs, with one
warning.

The CPU check reads ``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``: with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` an AVX-512 machine decides, and runs, as an AVX2 one. The
model's CPU fast paths (``vitlab.model.fast``) take their capability from here too.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
Resolved = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

# The CIFAR-sized model's training step under emulated bf16 autocast against fp32, same process, alternating, on a
# 2-core CPU held to AVX2 (scripts/bench_cpu.sh --avx2; docs/speed.md, "Two CPU classes").
EMULATED_BF16_COST = "about 16x slower per training step than fp32"


def cpu_capability() -> str:
    """ATen's CPU code path: ``"AVX512"``, ``"AVX2"``, ``"DEFAULT"`` (or ``"ZVECTOR"``/``"SVE..."`` off x86);
    ``ATEN_CPU_CAPABILITY`` lowers it."""
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_bf16_instructions() -> bool:
    """Whether the CPU has AVX512-BF16 or AMX, whatever code path ATen takes (``cpu_native_bf16`` needs both;
    tests replace this probe, and ``cpu_capability``, to decide as another CPU class would)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively: AVX512-BF16 or AMX, with ATen on its AVX-512 code path."""
    return cpu_capability().startswith("AVX512") and cpu_bf16_instructions()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively (and so faster than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_native_bf16()
    return False


def hardware(device: torch.device | str) -> str:
    """A short name of the compute hardware's class, for logs and result files (e.g. ``"cpu AVX512 + bf16"``)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu {cpu_capability()}" + (" + bf16" if cpu_native_bf16() else " (no native bf16)")
    return device.type


_warned: set[str] = set()


def resolve(precision: str, device: torch.device | str) -> Resolved:
    """``auto`` -> ``bf16`` where ``device`` runs it natively, else ``fp32``; ``fp32`` and ``bf16`` as given (an
    emulated ``bf16`` warns once per process). Anything else is a ``ValueError`` naming the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        where = hardware(device)
        if where not in _warned:
            _warned.add(where)
            cost = EMULATED_BF16_COST if torch.device(device).type == "cpu" else "slower than fp32"
            warnings.warn(f"vitlab: precision bf16 on {where}: this device has no native bf16, so it is emulated, "
                          f"{cost}; precision auto (the default) picks fp32 here", RuntimeWarning, stacklevel=2)
    return precision  # type: ignore[return-value]


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context that computes in ``precision`` (resolved here if it is ``auto``): bf16 autocast, or nothing."""
    device = torch.device(device)
    if resolve(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
