"""vitlab's C++ CPU kernels, for CPUs with AVX512-BF16: bf16 softmax attention, forward and backward
(``csrc/cpu_attention.cpp``), the tanh-approximation GELU with its gradient, bf16 or fp32 (``csrc/cpu_gelu.cpp``),
and LayerNorm of fp32 input with a bf16 result, with its gradient (``csrc/cpu_layer_norm.cpp``).

They are compiled on first use by torch's extension builder (``torch.utils.cpp_extension.load``; a C++ compiler is
all it needs) into one module cached by torch under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
so only the first process on a machine pays the ~30-second build. Where the CPU lacks AVX512-BF16, the build fails
(a warning says why) or ``VITLAB_CPU_KERNELS=0`` is set, ``kernels()`` returns None and the model keeps its
torch-op paths, which compute the same functions more slowly.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("cpu_attention.cpp", "cpu_gelu.cpp",
                                                                  "cpu_layer_norm.cpp")]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}

# Flags under which ATen's vector header compiles its AVX-512 code path, plus the bf16 dot-product instruction the
# kernel's matmuls are written in. The build is per machine, like inductor's.
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx512bf16",
          "-DCPU_CAPABILITY_AVX512"]
_NAME = "vitlab_cpu_kernels_avx512_bf16"


def supported() -> bool:
    """Whether this CPU can run the kernels: AVX512-BF16 (e.g. AMD Zen 4 and later, Intel Cooper Lake, Sapphire
    Rapids and later), with torch using its AVX-512 code path."""
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(has_bf16())


def _enabled() -> bool:
    return os.environ.get("VITLAB_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cached(cpp_extension: ModuleType) -> bool:
    """Whether torch already holds a build (only to decide whether to announce one: torch's build directory is
    private API, so a failure here must not cost the kernel itself)."""
    try:
        return (Path(cpp_extension._get_build_directory(_NAME, verbose=False)) / f"{_NAME}.so").exists()
    except Exception:  # noqa: BLE001
        return False


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    if not _cached(cpp_extension):
        print(f"vitlab: building the CPU kernels {_NAME} (~30 s, once; torch caches it)",
              file=sys.stderr, flush=True)
    try:
        # -fopenmp: at::parallel_for is a header template that runs threads only where OpenMP is compiled in; the
        # library it links is libgomp.so.1, the one torch has already loaded.
        return cpp_extension.load(name=_NAME, sources=[str(path) for path in _SOURCES], extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the torch-op path
        names = ", ".join(path.name for path in _SOURCES)
        warnings.warn(f"vitlab: could not build {names} ({type(error).__name__}: {error}); bf16 attention, the "
                      "tanh GELU and autocast LayerNorm on the CPU use torch ops instead (same results, slower). "
                      "Set VITLAB_CPU_KERNELS=0 to skip the build.", RuntimeWarning, stacklevel=3)
        return None


def kernels() -> ModuleType | None:
    """The compiled module, built on the first call: ``attention_forward(q, k, v, scale)`` on bf16 (B, H, N, hd)
    tensors with a dense last dimension, even strides and hd a multiple of 16, and ``attention_backward(q, k, v,
    dout, scale)``, which returns dq, dk, dv as one (B, N, 3, H, hd) tensor; ``gelu_tanh_forward(x)`` and
    ``gelu_tanh_backward(grad_output, x)`` on contiguous bf16 or fp32 tensors; ``layer_norm_bf16_forward(x, weight,
    bias, eps)`` -> (bf16 y, mean, rstd) and ``layer_norm_bf16_backward(grad_output, x, weight, mean, rstd)`` ->
    (dx, dweight, dbias). None where it is switched off, the CPU lacks AVX512-BF16, or it cannot be built."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                _state["module"] = _build() if _enabled() and supported() else None
    return _state["module"]
