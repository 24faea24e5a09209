"""The benchmark runs end to end on a tiny model and its arithmetic (throughput, ratio, MFU) is right; the ONNX
export round-trips through onnxruntime. No assertion is ever made about how fast anything is."""

from __future__ import annotations

import json

import pytest
import torch

from vitlab.bench.benchmark import BenchSpec, result_row, format_table, run_benchmark, write_json
from vitlab.bench.flops import count_flops
from vitlab.bench.models import BenchModel, bench_model, build_pair, max_output_difference, timm_kwargs
from vitlab.bench.timing import interleaved, matmul_peak, mfu
from vitlab.model import ViTConfig

TINY = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)


def test_mfu_and_row_arithmetic_by_hand() -> None:
    # 1e9 FLOPs per image, batch 4, 0.5 s per call -> 8e9 FLOP/s; against a 16e9 FLOP/s peak that is 50%.
    assert mfu(4e9, 0.5, 16e9) == pytest.approx(0.5)
    bm = BenchModel("x", TINY, 4, 4)
    times = {"vitlab": [0.5, 0.4, 0.6], "timm": [1.0, 0.8, 0.9]}
    row = result_row(bm, "infer", "fp32", "eager", 4, times, flops_per_image=int(1e9), peak=16e9)
    assert row["vitlab_ms"] == 500.0 and row["timm_ms"] == 900.0  # medians
    assert row["vitlab_img_s"] == 8.0 and row["timm_img_s"] == pytest.approx(4.444, abs=1e-3)
    assert row["ratio"] == pytest.approx(1.8)  # vitlab speed / timm speed
    assert row["vitlab_mfu"] == pytest.approx(0.5)
    train = result_row(bm, "train", "fp32", "eager", 4, times, flops_per_image=int(1e9), peak=16e9)
    assert train["vitlab_mfu"] == pytest.approx(1.5)  # forward + backward = 3 forwards


def test_interleaved_alternates_order() -> None:
    calls: list[str] = []
    interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


def test_matmul_peak_is_a_rate() -> None:
    assert matmul_peak(torch.float32, n=64, reps=2) > 0


def test_timm_model_computes_the_same_function() -> None:
    for config in (TINY, TINY.replace(classifier="gap", gelu="tanh", norm_eps=1e-5)):
        ours, theirs = build_pair(config)
        assert max_output_difference(ours, theirs, config) < 1e-5
    with pytest.raises(ValueError, match="learned 1D position embedding"):
        timm_kwargs(TINY.replace(pos_embed="sincos-2d"))


def test_cifar_model_is_the_training_recipe() -> None:
    from vitlab.train.config import load_config

    preset = load_config("small-scratch")
    config = bench_model("cifar").config
    assert config.image_hw == (preset.image_size, preset.image_size)
    assert config.width == preset.model_overrides["width"] and config.depth == preset.model_overrides["depth"]


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_model(tmp_path) -> None:
    spec = BenchSpec(models=("tiny",), models_override={"tiny": TINY}, dtypes=("fp32", "bf16-weights"),
                     modes=("eager",), tasks=("infer", "latency", "train"), reps=2, latency_reps=2,
                     infer_batch={"tiny": 4}, train_batch={"tiny": 4}, memory=False, data=False, peak_n=64)
    result = run_benchmark(spec)
    rows = {(r["task"], r["dtype"]): r for r in result["rows"]}
    assert set(rows) == {("infer", "fp32"), ("latency", "fp32"), ("train", "fp32"), ("infer", "bf16-weights"),
                         ("latency", "bf16-weights")}  # no training with bf16 weights
    assert rows[("latency", "fp32")]["batch"] == 1
    for r in rows.values():
        assert len(r["vitlab_times_s"]) == len(r["timm_times_s"]) == 2
        assert r["flops_per_image"] == count_flops(TINY)
        assert r["ratio"] == pytest.approx(r["vitlab_img_s"] / r["timm_img_s"], rel=1e-2)
    assert rows[("infer", "bf16-weights")]["max_abs_diff"] < 0.1
    assert result["machine"]["versions"]["torch"] == torch.__version__.split("+")[0] or \
        result["machine"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])
    table = format_table(result)
    assert "bf16-weights" in table and "ratio" in table
    from vitlab.bench.benchmark import format_markdown

    md = format_markdown(result).splitlines()
    assert len(md) == 2 + len(result["rows"]) and md[2].startswith("| tiny | infer | fp32 | eager | 4 |")
    path = write_json(result, tmp_path / "out.json")
    assert json.loads(path.read_text())["rows"][0]["model"] == "tiny"


def test_peak_memory_child_process() -> None:
    from vitlab.bench.benchmark import peak_memory

    mb = peak_memory(TINY, "vitlab", "train", "fp32", 4, BenchSpec())
    assert mb is not None and mb >= 0


def test_cli_bench_writes_json(tmp_path, capsys) -> None:
    from vitlab.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--models", "cifar", "--dtypes", "fp32", "--modes", "eager", "--tasks", "latency",
               "--reps", "1", "--latency-reps", "1", "--warmup", "0", "--no-memory", "--no-data", "--peak-n", "64",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["rows"][0]["model"] == "cifar" and data["rows"][0]["task"] == "latency"
    assert "cifar" in capsys.readouterr().out


def test_cli_bench_rejects_unknown_dtype() -> None:
    from vitlab.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--dtypes", "fp8"])
