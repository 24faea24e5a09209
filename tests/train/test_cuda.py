"""The training engine on a CUDA device (it picks the GPU whenever one is visible): an fp32 run takes the steps
the CPU takes, and a bf16 run's saved weights evaluate to the run's own final numbers. Skipped without a GPU;
run on a GPU machine with ``pytest -m cuda`` (scripts/gpu_check.sh)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from tests.train.tiny import make_folder, tiny_overrides
from vitlab.train import evaluate, load_config, train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data")


def _losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "split" not in r]


def test_fp32_run_on_cuda_takes_the_cpu_steps(data, tmp_path, monkeypatch):
    """Same seed, data order and augmentation (drawn on the CPU either way; on the GPU in a prefetching thread,
    RandAugment and mixup included): the GPU's losses and final weights follow the CPU's to fp32 rounding (TF32
    off), so the device changes nothing but speed. SGD, because Adam's normalised step turns rounding-level
    gradients of either sign into full-size steps."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = load_config(None, tiny_overrides(epochs=3, lr=0.05, optimizer="sgd", randaugment_n=1, mixup=0.8))
    gpu = train(cfg, data, tmp_path / "gpu")
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        cpu = train(cfg, data, tmp_path / "cpu")
    assert gpu["step"] == cpu["step"] == 18
    assert _losses(tmp_path / "gpu") == pytest.approx(_losses(tmp_path / "cpu"), rel=1e-4, abs=1e-5)
    w_gpu = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    w_cpu = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    assert w_gpu.keys() == w_cpu.keys()
    for k in w_cpu:
        torch.testing.assert_close(w_gpu[k], w_cpu[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_run_on_cuda_saves_what_it_evaluated(data, tmp_path):
    cfg = load_config(None, tiny_overrides(epochs=4, lr=0.003, precision="bf16", eval_every=1, randaugment_n=0,
                                           ema_decay=0.9))
    result = train(cfg, data, tmp_path / "run")
    assert result["top1"] > 60  # three colour classes; chance is 33%
    model = vitlab.load(tmp_path / "run" / "model.safetensors").cuda()
    fresh = evaluate(model, data / "val", precision="bf16")
    assert fresh["top1"] == result["top1"] and fresh["loss"] == pytest.approx(result["loss"], rel=1e-3)
