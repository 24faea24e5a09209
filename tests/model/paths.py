"""What the speed-path tests share: a skip mark per CPU path (``vitlab.model.fast.PATHS``) for CPUs that cannot take
it, and that path's C++ kernel module, or a skip where it is switched off or cannot be built."""

from __future__ import annotations

import pytest

from vitlab.model import cpu_kernels, fast

NEEDS_AVX512_BF16 = pytest.mark.skipif(not fast.available("avx512-bf16"), reason="this CPU cannot take the "
                                       "avx512-bf16 path (it needs AVX512-BF16 or AMX, with torch on its AVX-512 "
                                       "code path)")
NEEDS_AVX2 = pytest.mark.skipif(not fast.available("avx2"), reason="this CPU cannot take the avx2 path (it needs "
                                "AVX2 and FMA, with torch on its AVX2 or AVX-512 code path)")


def kernel_module(path: str):
    """The C++ kernels of ``path`` ("avx512-bf16" or "avx2"), built on first use; skips the test where they are off."""
    module = cpu_kernels.kernels() if path == "avx512-bf16" else cpu_kernels.fp32_kernels()
    if module is None:
        pytest.skip(f"the {path} C++ kernels are switched off (VITLAB_CPU_KERNELS=0) or could not be built here")
    return module
