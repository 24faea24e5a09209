"""The training loop in-process on tiny generated folders: outputs, optimiser details, fine-tuning, bad images."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import vitlab
from tests.train.tiny import make_folder, tiny_overrides
from vitlab.data.images import BadImageError
from vitlab.train import NonFiniteLossError, evaluate, load_config, train
from vitlab.train import engine
from vitlab.train import data as run_data
from vitlab.train.clock import RunClock
from vitlab.train.engine import EMA, param_groups, train_step


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data")


def test_run_writes_all_outputs_and_learns(data, tmp_path):
    cfg = load_config(None, tiny_overrides(epochs=5, lr=0.003, randaugment_n=0))
    result = train(cfg, data, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl", "model.safetensors", "final.json"):
        assert (run / name).is_file(), name
    assert result["step"] == 30 and result["n"] == 12
    assert result["top1"] > 60  # three colour classes; chance is 33%
    model = vitlab.load(run / "model.safetensors")
    assert model.labels == ["c0", "c1", "c2"]
    again = evaluate(model, data / "val", precision="fp32")
    assert again["top1"] == result["top1"] and again["loss"] == pytest.approx(result["loss"], rel=1e-5)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, 31))
    assert json.loads((run / "config.json").read_text())["lr"] == 0.003
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, data, run)


def test_bf16_evaluations_during_training_see_the_current_weights(data, tmp_path):
    """Evaluations inside a bf16 run use the fused inference path's cached bf16 weights; after the fused
    optimiser's steps (which do not bump version counters) they must still see the weights being trained: the
    run's final evaluation equals a fresh process-style evaluation of the saved weights."""
    cfg = load_config(None, tiny_overrides(epochs=4, lr=0.003, precision="bf16", eval_every=1, randaugment_n=0))
    result = train(cfg, data, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "val"]
    assert len(evals) >= 3 and len({round(r["loss"], 6) for r in evals}) == len(evals)  # the model moved
    fresh = evaluate(vitlab.load(tmp_path / "run" / "model.safetensors"), data / "val", precision="bf16")
    # Equal up to bf16 rounding (measured 1.3e-4 relative), where stale weights would be off by as much as one
    # epoch's training moves the loss (checked to be far larger).
    moves = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(evals, evals[1:])]
    assert min(moves[-2:]) > 1e-2
    assert result["loss"] == pytest.approx(fresh["loss"], rel=1e-3) and result["top1"] == fresh["top1"]


def test_weight_decay_only_on_matrices():
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}
    with_emb = {names[id(p)] for p in param_groups(model, 0.1, decay_embeddings=True)[0]["params"]}
    assert with_emb == decayed | {"pos_embed", "cls_token"}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizer_is_fused_and_steps_like_torchs_reference(optimizer):
    """The fused kernels must take the step torch's per-parameter implementation takes, decay groups included."""
    torch.manual_seed(0)
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    reference = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                    num_heads=2, mlp_dim=64)
    reference.load_state_dict(model.state_dict())
    cfg = load_config(None, [f"optimizer={optimizer}", "lr=0.01", "weight_decay=0.1"])
    ours = engine.build_optimizer(model, cfg)
    assert ours.defaults["fused"] is True
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
    extra = {"momentum": cfg.momentum} if optimizer == "sgd" else {"betas": cfg.betas}
    ref = kind(param_groups(reference, 0.1), lr=0.01, foreach=False, **extra)
    for _ in range(3):
        # The same random gradients on both (backprop would differ in rounding, which Adam amplifies where a
        # gradient is ~0, such as the key bias's).
        for a, b in zip(model.parameters(), reference.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(model.head.weight, torch.zeros_like(model.head.weight))  # the steps did move it


class _FixedLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :, 0, 0]  # the "image" holds its own logits


def test_evaluate_by_hand():
    logits = torch.tensor([[3.0, 2, 1, 0, 0, 0], [0, 3, 2, 1, 0, 0], [0, 1, 2, 3, 4, 5], [1, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 2, 0, 3])
    batches = [(logits[:2, :, None, None], labels[:2]), (logits[2:, :, None, None], labels[2:])]
    r = evaluate(_FixedLogits(), batches, precision="fp32", device="cpu")
    # top-1 hits: sample 0 (0) and 3 (0 vs label 3: miss) -> 1/4; top-5: sample 2's label 0 is its lowest -> 3/4.
    assert r["top1"] == 25.0 and r["top5"] == 75.0
    assert r["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
    assert r["confusion"][0][0] == 1 and r["confusion"][0][5] == 1 and r["confusion"][3][0] == 1
    assert r["per_class"] == {"0": 50.0, "2": 0.0, "3": 0.0}


def test_ema_update_formula():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(ema.state[k], 0.9 * before[k] + 0.1 * v)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    results = []
    for parts in ([(x, y)], [(x[:4], y[:4]), (x[4:], y[4:])], [(x[:2], y[:2]), (x[2:], y[2:])]):
        torch.manual_seed(0)
        model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                    num_heads=2, mlp_dim=64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = load_config(None, ["precision=fp32", "grad_clip=null"])
        train_step(model, opt, parts, config=cfg, device=torch.device("cpu"), step=0, rank=0, lr=0.1)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6) and torch.allclose(results[0], results[2], atol=1e-6)


def test_non_finite_loss_stops_naming_the_step(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = engine.loss_fn

    def poisoned(logits, targets, smoothing):
        calls["n"] += 1
        loss = real(logits, targets, smoothing)
        return loss * float("nan") if calls["n"] == 4 else loss  # the 4th step is step 3

    monkeypatch.setattr(engine, "loss_fn", poisoned)
    cfg = load_config(None, tiny_overrides(checkpoint_every=2))
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg, data, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_fine_tune_new_classes_and_resolution(data, tmp_path):
    source = vitlab.create_model("ViT-Ti/16", num_classes=7, image_size=8, patch_size=4, width=32, depth=2,
                                 num_heads=2, mlp_dim=64)
    vitlab.save(source, tmp_path / "pre.safetensors")
    cfg = load_config("paper-finetune", ["init=" + str(tmp_path / "pre.safetensors"), "image_size=16", "steps=3",
                                         "batch_size=8", "accum_steps=2", "precision=fp32", "threads=1",
                                         "warmup_steps=1", "in_memory=true", "eval_every=0"])
    result = train(cfg, data, tmp_path / "ft")
    tuned = vitlab.load(tmp_path / "ft" / "model.safetensors")
    assert tuned.config.num_classes == 3 and tuned.config.image_hw == (16, 16)
    assert tuned.pos_embed.shape == (1, 1 + 16, 32)
    assert result["step"] == 3
    # The encoder started from the source weights (fine-tuned, not re-initialised): still close after 3 steps.
    assert torch.allclose(tuned.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight, atol=0.05)
    assert not torch.equal(tuned.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_bad_images_are_skipped_listed_or_stop_under_strict(data, tmp_path, in_memory):
    bad = data / "train" / "c0" / "zz_zero.jpg"
    bad.write_bytes(b"")
    (data / "train" / "c1" / "zz_text.png").write_text("not an image")
    cfg = load_config(None, tiny_overrides(epochs=1, in_memory=in_memory))
    result = train(cfg, data, tmp_path / "run")
    assert result["skipped_images"] == 2
    log = (tmp_path / "run" / "run.log").read_text()
    assert str(bad) in log and "zz_text.png" in log
    with pytest.raises(BadImageError, match="zz_"):
        train(cfg.replace(strict=True), data, tmp_path / "strict")


def test_resume_refuses_a_different_config(data, tmp_path):
    cfg = load_config(None, tiny_overrides(epochs=1))
    train(cfg, data, tmp_path / "run")
    with pytest.raises(ValueError, match="lr"):
        train(cfg.replace(lr=0.5), data, tmp_path / "run", resume=True)


def test_tensorboard_events_hold_the_logged_loss(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, tiny_overrides(epochs=1, tensorboard=True))
    train(cfg, data, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "split" not in r]
    assert [round(e.value, 5) for e in acc.Scalars("train/loss")] == [round(v, 5) for v in losses]


def test_train_step_at_a_lower_resolution_resizes_and_samples_the_embedding():
    # image_size=8 on 16-px batches: the model sees 8-px images (a 2x2 grid, position embedding interpolated), and
    # the step equals feeding the antialiased 8-px batch to a copy resized with set_image_size.
    import copy

    torch.manual_seed(0)
    model = vitlab.create_model("ViT-Ti/16", num_classes=3, image_size=16, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    with torch.no_grad():
        model.head.weight.normal_()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    small = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    reference = copy.deepcopy(model)
    reference.set_image_size(8)
    seen = []
    model.patch_embed.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    cfg = load_config(None, ["precision=fp32", "grad_clip=null", "label_smoothing=0"])
    loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [(x, y)], config=cfg,
                         device=torch.device("cpu"), step=0, rank=0, lr=0.0, image_size=8)
    assert seen == [(4, 3, 8, 8)]
    expected = torch.nn.functional.cross_entropy(reference(small), y).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def _record_training_sizes(monkeypatch) -> list[int]:
    """The image side of every training-mode forward of any VisionTransformer, in order."""
    sizes = []
    original = vitlab.model.VisionTransformer.forward

    def spy(self, x, **kwargs):
        if self.training:
            sizes.append(x.shape[-1])
        return original(self, x, **kwargs)

    monkeypatch.setattr(vitlab.model.VisionTransformer, "forward", spy)
    return sizes


def test_low_resolution_phase_then_full_resolution(data, tmp_path, monkeypatch):
    sizes = _record_training_sizes(monkeypatch)
    cfg = load_config(None, tiny_overrides(steps=10, low_res_size=8, low_res_fraction=0.6))
    result = train(cfg, data, tmp_path / "run")
    assert sizes == [8] * 6 + [16] * 4
    assert result["step"] == 10 and vitlab.load(tmp_path / "run" / "model.safetensors").config.image_hw == (16, 16)
    with pytest.raises(ValueError, match="low_res_size must be in"):
        load_config(None, tiny_overrides(low_res_size=32))


def test_progressive_resizing_through_several_resolutions(data, tmp_path, monkeypatch):
    sizes = _record_training_sizes(monkeypatch)
    cfg = load_config(None, tiny_overrides(steps=10, low_res_size="[8,12]", low_res_fraction="[0.3,0.5]"))
    assert cfg.resolution_stages() == [(8, 0.3), (12, 0.5), (16, 1.0)]
    train(cfg, data, tmp_path / "run")
    assert sizes == [8] * 3 + [12] * 2 + [16] * 5
    for bad, match in [(dict(low_res_size="[8,12]", low_res_fraction=0.5), "one end per low_res_size"),
                       (dict(low_res_size="[8,12]", low_res_fraction="[0.5,0.3]"), "increasing"),
                       (dict(low_res_size="[8,20]", low_res_fraction="[0.3,0.5]"), "low_res_size must be in"),
                       (dict(low_res_size="[8,x]", low_res_fraction="[0.3,0.5]"), "list of int")]:
        with pytest.raises(ValueError, match=match):
            load_config(None, tiny_overrides(**bad))


def test_budget_estimate_scales_the_step_rate_by_each_stages_tokens():
    """Hand computation: 10 steps/s measured at 16 px over a 100 s budget, 20 s elapsed; 16 px until 40 s, 24 px
    until 80 s, 32 px to the end. Steps still to come: 10*20 + 10*40*(16/24)^2 + 10*20*(16/32)^2 = 427.8."""
    budget = ["budget_minutes=" + str(100 / 60), "image_size=32"]
    cfg = load_config(None, budget + ["low_res_size=[16,24]", "low_res_fraction=[0.4,0.8]"])
    clock = RunClock(cfg, total_steps=10**6)  # the step rate is measured from (step 0, 0 s)
    total = clock.budget_steps(200, 20.0, 16)
    assert total == pytest.approx(200 + 200 + 400 * (16 / 24) ** 2 + 200 * 0.25, abs=1.0)
    # One low-resolution stage: the formula of the two-phase schedule (low_left + rest * token ratio).
    cfg = load_config(None, budget + ["low_res_size=24", "low_res_fraction=0.8"])
    total = RunClock(cfg, total_steps=10**6).budget_steps(200, 20.0, 24)
    assert total == pytest.approx(200 + 10 * (60 + 20 * (24 / 32) ** 2), abs=1.0)


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_mixing_stops_for_the_final_share_of_the_run(data, tmp_path, monkeypatch, in_memory):
    """With ``mix_off_fraction=0.5`` the last half of the steps train on exactly the batches of a run without
    mixing (same images, class-index targets); the first half on mixed ones."""
    seen = []
    original = engine.train_step

    def spy(model, optimizer, parts, **kwargs):
        seen.append((torch.cat([x for x, _ in parts]).clone(), torch.cat([y for _, y in parts]).clone()))
        return original(model, optimizer, parts, **kwargs)

    monkeypatch.setattr(engine, "train_step", spy)
    common = dict(steps=6, in_memory=in_memory, randaugment_n=0)
    train(load_config(None, tiny_overrides(mixup=1.0, mix_off_fraction=0.5, **common)), data, tmp_path / "mixed")
    mixed, seen[:] = list(seen), []
    train(load_config(None, tiny_overrides(**common)), data, tmp_path / "plain")
    plain = list(seen)
    assert len(mixed) == len(plain) == 6
    for (xm, ym), (xp, yp) in zip(mixed[:3], plain[:3]):
        assert ym.dtype == torch.float32 and ym.shape == (len(yp), 3)
        assert (ym.amax(1) < 1).any() and not torch.equal(xm, xp)  # blended targets (same-class pairs stay 1)
    for (xm, ym), (xp, yp) in zip(mixed[3:], plain[3:]):
        assert torch.equal(xm, xp) and torch.equal(ym, yp) and ym.dtype == torch.int64
    with pytest.raises(ValueError, match="mix_off_fraction must be in"):
        load_config(None, tiny_overrides(mix_off_fraction=1.5))


def test_prefetched_batches_train_exactly_like_inline_ones(data, tmp_path, monkeypatch):
    """The GPU's background-thread loading (forced on here, on the CPU) hands the step the same batches across
    epoch boundaries: with no dropout drawing from the shared RNG the weights end equal, and the loader's rate is
    taken from the thread's busy time."""
    cfg = load_config(None, tiny_overrides(steps=14, mixup=1.0, randaugment_n=1))  # 6 steps per epoch
    inline = train(cfg, data, tmp_path / "inline")
    monkeypatch.setattr(run_data, "prefetches", lambda device: True)
    prefetched = train(cfg, data, tmp_path / "prefetched")
    assert inline["step"] == prefetched["step"] == 14
    a = vitlab.load(tmp_path / "inline" / "model.safetensors").state_dict()
    b = vitlab.load(tmp_path / "prefetched" / "model.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert prefetched["loader_img_per_s"] > 0 and prefetched["loader_img_per_s"] != inline["loader_img_per_s"]
