"""vitlab's C++ CPU kernels, two builds. ``kernels()``, for CPUs with AVX512-BF16: bf16 softmax attention, forward
and backward (``csrc/cpu_attention.cpp``), the tanh-approximation GELU with its gradient, bf16 or fp32
(``csrc/cpu_gelu.cpp``), and LayerNorm of fp32 input with a bf16 result, with its gradient
(``csrc/cpu_layer_norm.cpp``). ``fp32_kernels()``, for AVX2 + FMA CPUs (``csrc/cpu_fp32.cpp``): fp32 softmax attention for
short sequences, the tanh GELU and its gradient, bias + GELU on a matmul's output, and bias + drop-path + residual
add, forward and backward. ``vitlab.model.fast`` decides which runs.

They are compiled on first use by torch's extension builder (``torch.utils.cpp_extension.load``; a C++ compiler is
all it needs) into one module cached by torch under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
so only the first process on a machine pays the build (~30 s, or ~10 s for the fp32 one). Where the CPU lacks the
instructions, the build fails (a warning says why) or ``VITLAB_CPU_KERNELS=0`` is set, the functions return None
and the model keeps its torch-op paths, which compute the same functions more slowly.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from vitlab import precision

_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("cpu_attention.cpp", "cpu_gelu.cpp",
                                                                  "cpu_layer_norm.cpp")]
_FP32_SOURCES = [Path(__file__).with_name("csrc") / "cpu_fp32.cpp"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}

# Flags under which ATen's vector header compiles its AVX-512 code path, plus the bf16 dot-product instruction the
# kernel's matmuls are written in. The build is per machine, like inductor's.
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx512bf16",
          "-DCPU_CAPABILITY_AVX512"]
_NAME = "vitlab_cpu_kernels_avx512_bf16"
_FP32_FLAGS = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
_FP32_NAME = "vitlab_cpu_kernels_avx2_fp32"


def supported() -> bool:
    """Whether this CPU can run ``kernels()``: AVX512-BF16 (e.g. AMD Zen 4 and later, Intel Cooper Lake, Sapphire
    Rapids and later), with torch using its AVX-512 code path."""
    return precision.cpu_capability() == "AVX512" and bool(getattr(torch.cpu, "_is_avx512_bf16_supported",
                                                                    lambda: False)())


def fp32_supported() -> bool:
    """Whether this CPU can run ``fp32_kernels()``: AVX2 and FMA, torch on its AVX2 or AVX-512 code path."""
    return precision.cpu_capability() in ("AVX2", "AVX512")


def _enabled() -> bool:
    return os.environ.get("VITLAB_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cached(cpp_extension: ModuleType, name: str) -> bool:
    """Whether torch already holds a build (only to decide whether to announce one: torch's build directory is
    private API, so a failure here must not cost the kernel itself)."""
    try:
        return (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # noqa: BLE001
        return False


def _build(name: str, sources: list[Path], flags: list[str]) -> ModuleType | None:
    from torch.utils import cpp_extension

    if not _cached(cpp_extension, name):
        print(f"vitlab: building the CPU kernels {name} (once; torch caches it)", file=sys.stderr, flush=True)
    try:
        # -fopenmp: at::parallel_for is a header template that runs threads only where OpenMP is compiled in; the
        # library it links is libgomp.so.1, the one torch has already loaded.
        return cpp_extension.load(name=name, sources=[str(path) for path in sources], extra_cflags=flags,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the torch-op path
        names = ", ".join(path.name for path in sources)
        warnings.warn(f"vitlab: could not build {names} ({type(error).__name__}: {error}); the model uses torch "
                      "ops instead (same results, slower). Set VITLAB_CPU_KERNELS=0 to skip the build.",
                      RuntimeWarning, stacklevel=3)
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
                _state["module"] = _build(_NAME, _SOURCES, _FLAGS) if _enabled() and supported() else None
    return _state["module"]


def fp32_kernels() -> ModuleType | None:
    """The fp32 module, built on the first call: ``gelu_tanh_forward(x)``, ``gelu_tanh_backward(grad_output, x)``
    on contiguous fp32 tensors; ``bias_gelu_(h, bias, approximate)``, h <- GELU(h + bias) in place for a
    contiguous fp32 (M, N) ``h`` (``approximate`` "tanh" or "none"), and for training ``bias_gelu_forward(z, bias,
    approximate)`` / ``bias_gelu_backward(grad_output, z, bias, approximate)`` -> (dz, dbias); ``bias_residual_
    forward(x, y, bias, mask)`` = x + mask[b] (y + bias) / ``bias_residual_backward(grad_output, mask)`` -> (dy,
    dbias); ``attention_forward(qkv, scale)``, ``attention_forward_probs(qkv, scale)`` -> (out, probs) and
    ``attention_backward(qkv, dout, scale, saved_probs=None)`` on fp32 (B, N, 3, H, hd) ``qkv``. None where it is
    switched off, the CPU lacks AVX2, or it cannot be built."""
    if "fp32" not in _state:
        with _lock:
            if "fp32" not in _state:
                ok = _enabled() and fp32_supported()
                _state["fp32"] = _build(_FP32_NAME, _FP32_SOURCES, _FP32_FLAGS) if ok else None
    return _state["fp32"]
