"""TrainConfig loading: presets, files, type-checked ``--set`` overrides, schedules."""

from __future__ import annotations

import math

import pytest

from vitlab.train import TrainConfig, list_presets, load_config, lr_at
from vitlab.train.config import PRESET_DIR


def test_presets_load_and_say_how_to_launch():
    assert {"paper-pretrain", "paper-finetune", "small-scratch", "demo"} <= set(list_presets())
    for name in list_presets():
        cfg = load_config(name)
        text = (PRESET_DIR / f"{name}.yaml").read_text()
        assert text.startswith("#") and "Launch:" in text and "Reaches:" in text
        assert isinstance(cfg, TrainConfig)
    pre = load_config("paper-pretrain")
    assert (pre.batch_size, pre.weight_decay, pre.warmup_steps, pre.schedule) == (4096, 0.1, 10000, "linear")
    ft = load_config("paper-finetune")
    assert (ft.optimizer, ft.momentum, ft.weight_decay, ft.grad_clip, ft.image_size, ft.batch_size) == \
        ("sgd", 0.9, 0.0, 1.0, 384, 512)


def test_overrides_are_parsed_and_type_checked():
    cfg = load_config("demo", ["lr=3e-4", "epochs=2", "betas=[0.9, 0.95]", "model_overrides.depth=2",
                               "init=null", "in_memory=false"])
    assert cfg.lr == 3e-4 and cfg.epochs == 2.0 and isinstance(cfg.epochs, float)
    assert cfg.betas == (0.9, 0.95) and cfg.model_overrides["depth"] == 2 and cfg.in_memory is False
    with pytest.raises(ValueError, match=r"lr='fast'.*float"):
        load_config("demo", ["lr=fast"])
    with pytest.raises(ValueError, match="batch_size"):
        load_config("demo", ["batch_size=1.5"])
    with pytest.raises(ValueError, match="optimizer"):
        load_config("demo", ["optimizer=lamb"])
    with pytest.raises(ValueError, match="unknown key 'lr_max'"):
        load_config("demo", ["lr_max=1"])
    with pytest.raises(ValueError, match="key=value"):
        load_config("demo", ["lr"])
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("no-such-preset")


def test_yaml_and_python_files(tmp_path):
    (tmp_path / "a.yaml").write_text("model: ViT-S/16\nlr: 0.01\n")
    assert load_config(tmp_path / "a.yaml").model == "ViT-S/16"
    (tmp_path / "b.py").write_text("config = {'model': 'ViT-B/32', 'batch_size': 64}\n")
    cfg = load_config(tmp_path / "b.py", ["batch_size=32"])
    assert (cfg.model, cfg.batch_size) == ("ViT-B/32", 32)
    (tmp_path / "c.yaml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="c.yaml"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict():
    cfg = load_config("small-scratch")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_schedule_by_hand():
    kw = dict(total_steps=110, peak=1.0, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)  # cosine half way
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(60, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_at(110, kind="linear", min_lr=0.1, **kw) == pytest.approx(0.1)
    assert lr_at(50, kind="constant", **kw) == 1.0
