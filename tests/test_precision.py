"""The precision policy (``vitlab.precision``): ``auto`` is bf16 on CPUs that compute it natively (AVX512-BF16/AMX)
and fp32 on the others (AVX2), an explicit emulated bf16 warns once, and what a resolved precision means for
autocast; the defaults (``TrainConfig``, every preset) are ``auto``, and a training run records what it resolved to
and on which hardware."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.train.tiny import make_folder, tiny_overrides
from vitlab import precision
from vitlab.cli import main
from vitlab.model import fast
from vitlab.train.config import PRESET_DIR, TrainConfig, list_presets, load_config

REPO = Path(__file__).resolve().parents[1]

AS_AVX2 = """
import json, warnings
import torch
from vitlab import precision
from vitlab.model import fast
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # the once-only rule must be vitlab's own, not the warnings filter's
    explicit = [precision.resolve("bf16", "cpu"), precision.resolve("bf16", "cpu")]
try:
    with fast.use("avx512-bf16"):
        refused = ""
except ValueError as error:
    refused = str(error)
with precision.autocast("auto", "cpu"):
    auto_autocast = torch.is_autocast_enabled("cpu")
print(json.dumps({
    "capability": precision.cpu_capability(), "native": precision.cpu_native_bf16(),
    "auto": precision.resolve("auto", "cpu"), "explicit": explicit, "hardware": precision.hardware("cpu"),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "path": fast.cpu_path(), "available": {path: fast.available(path) for path in fast.PATHS},
    "refused": refused, "auto_autocast": auto_autocast}))
"""


@pytest.mark.skipif(not fast.available("avx2"), reason="torch runs below its AVX2 code path here, so it cannot "
                    "be made to decide as an AVX2 CPU")
def test_an_avx2_cpu_resolves_auto_to_fp32_and_takes_the_avx2_path() -> None:
    """``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` make any AVX2-or-better machine decide and compute as
    an AVX2 one (a fresh process: torch reads them at start)."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-c", AS_AVX2], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["capability"] == "AVX2" and result["native"] is False
    assert result["auto"] == "fp32" and result["auto_autocast"] is False
    assert result["hardware"] == "cpu AVX2 (no native bf16)"
    assert result["explicit"] == ["bf16", "bf16"]  # an explicit bf16 still runs ...
    assert len(result["warnings"]) == 1  # ... with one warning per process, naming the capability and the cost
    assert "cpu AVX2" in result["warnings"][0] and precision.EMULATED_BF16_COST in result["warnings"][0]
    assert "precision auto" in result["warnings"][0]
    assert result["path"] == "avx2"
    assert result["available"] == {"avx512-bf16": False, "avx2": True, "plain": True}
    assert "cannot take the avx512-bf16 path" in result["refused"] and "AVX2" in result["refused"]


@pytest.mark.parametrize("capability,instructions,native", [
    ("AVX512", True, True),     # Zen 4, Sapphire Rapids: bf16 instructions with ATen on its AVX-512 code
    ("AVX512", False, False),   # Skylake-X, Ice Lake: AVX-512 but no bf16 instructions
    ("AVX2", True, False),      # bf16 instructions, but ATen held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    ("AVX2", False, False),     # Zen 2/3, Intel before Sapphire Rapids
    ("DEFAULT", False, False),
])
def test_auto_follows_the_cpu_class(monkeypatch, capability, instructions, native) -> None:
    monkeypatch.setattr(precision, "cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: instructions)
    assert precision.cpu_native_bf16() is native and precision.native_bf16("cpu") is native
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    assert precision.resolve("fp32", "cpu") == "fp32"
    assert precision.hardware("cpu") == f"cpu {capability}" + (" + bf16" if native else " (no native bf16)")
    with precision.autocast("auto", "cpu"):
        assert torch.is_autocast_enabled("cpu") is native
        if native:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    if native:  # bf16 where it is native: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert precision.resolve("bf16", "cpu") == "bf16"


def test_invalid_precision_names_the_choices() -> None:
    for bad in ("fp16", "BF16", "", "mixed"):
        with pytest.raises(ValueError, match=f"precision must be one of auto, fp32, bf16, got {bad!r}"):
            precision.resolve(bad, "cpu")
        with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
            precision.autocast(bad, "cpu")
    with pytest.raises(ValueError, match="precision='fp16' .expected 'auto' | 'fp32' | 'bf16'"):
        load_config(None, ["precision=fp16"])


def test_autocast_means_what_the_precision_says() -> None:
    ctx = precision.autocast("fp32", "cpu")
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an emulated bf16 warns (once); its meaning is the same
        ctx = precision.autocast("bf16", "cpu")
    with ctx:
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_the_defaults_are_auto() -> None:
    assert TrainConfig().precision == "auto"
    presets = list_presets()
    assert presets and presets == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    for name in presets:
        assert load_config(name).precision == "auto", name


def test_train_records_precision_and_hardware(tmp_path, capsys) -> None:
    data = make_folder(tmp_path / "data", per_class=8, val_per_class=2)
    sets = [arg for s in tiny_overrides(epochs=1, precision="auto", randaugment_n=0) for arg in ("--set", s)]
    assert main(["train", "--config", "demo", "--data", str(data), "--out", str(tmp_path / "run"), *sets]) == 0
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    resolved, hardware = precision.resolve("auto", "cpu"), precision.hardware("cpu")
    assert final["precision"] == resolved and final["hardware"] == hardware
    assert f"vitlab train: precision {resolved} (auto on {hardware})" in capsys.readouterr().err
