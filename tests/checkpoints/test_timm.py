"""timm state dicts: random-weight timm models (the independent reference) loaded by vitlab and vitlab models
loaded by timm compute the same logits; round trips are bit-exact; unsupported timm features are refused."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

import vitlab
from tests.checkpoints.test_native import assert_same_weights, randomize
from vitlab.checkpoints import CheckpointError
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer

timm = pytest.importorskip("timm")

BASE = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)


def timm_vit(**kwargs) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return randomize(TimmViT(**{**BASE, **kwargs}))


def timm_hybrid(img_size: int = 32, **kwargs) -> torch.nn.Module:
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    # As timm's vit_base_r50_s16_224 builds its backbone (_resnetv2), at a tiny width.
    backbone = ResNetV2(layers=(1, 2), num_classes=0, global_pool="", in_chans=3, preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8), width_factor=0.5)
    embed = partial(HybridEmbed, backbone=backbone)
    return randomize(TimmViT(**{**BASE, "img_size": img_size, "patch_size": 1, "embed_layer": embed, **kwargs}))


CASES = {
    "patch4": (lambda: timm_vit(img_size=16, patch_size=4), {}),
    "patch8-nonsquare": (lambda: timm_vit(img_size=(16, 32), patch_size=8), {"image_size": (16, 32)}),
    "gap": (lambda: timm_vit(img_size=16, patch_size=4, class_token=False, global_pool="avg", fc_norm=False), {}),
    "no-embed-class": (lambda: timm_vit(img_size=16, patch_size=4, no_embed_class=True), {}),
    "no-qkv-bias": (lambda: timm_vit(img_size=16, patch_size=8, qkv_bias=False), {}),
    "hybrid": (timm_hybrid, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_timm_model_loaded_by_vitlab_computes_the_same_logits(tmp_path: Path, case: str) -> None:
    build, extra = CASES[case]
    ref = build()
    timm_sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    from safetensors.torch import save_file

    save_file(timm_sd, str(tmp_path / "w.safetensors"))
    model = vitlab.load(tmp_path / "w.safetensors", format="timm", model={"num_heads": 2, **extra})
    assert model.config.gelu == "exact" and model.config.norm_eps == 1e-6
    if model.config.backbone is not None:
        bb = model.config.backbone
        assert (bb.ws_eps, bb.ws_eps_in_sqrt, bb.gn_eps) == (1e-8, True, 1e-5)  # timm's, not the official ones
    x = torch.randn(2, 3, *model.config.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["patch4", "gap", "hybrid"])
def test_vitlab_model_loaded_by_timm_computes_the_same_logits(tmp_path: Path, case: str) -> None:
    build, _ = CASES[case]
    ref = build()  # a timm model of the same architecture, to receive the weights
    cfg = ViTConfig(image_size=32 if case == "hybrid" else 16, patch_size=1 if case == "hybrid" else 4, width=32,
                    depth=2, num_heads=2, mlp_dim=64, num_classes=5, classifier="gap" if case == "gap" else "token",
                    gelu="exact",
                    backbone=ResNetConfig(layers=(1, 2), width_factor=0.5, ws_eps=1e-8, ws_eps_in_sqrt=True,
                                          gn_eps=1e-5) if case == "hybrid" else None)
    model = randomize(VisionTransformer(cfg))
    path = vitlab.save(model, tmp_path / "w.safetensors", format="timm")
    from safetensors.torch import load_file

    ref.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, *cfg.image_hw)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vitlab_timm_vitlab_round_trip_is_bit_exact(tmp_path: Path, suffix: str) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=3,
                    gelu="exact")
    model = randomize(VisionTransformer(cfg))
    path = vitlab.save(model, tmp_path / f"w{suffix}", format="timm")
    back = vitlab.load(path, format="timm", model={"num_heads": 4})
    assert back.config == cfg
    assert_same_weights(model, back)


def test_in_memory_state_dict_and_named_model() -> None:
    ref = timm_vit(img_size=16, patch_size=4)
    model = vitlab.load(ref.state_dict(), format="timm", model={"num_heads": 2})
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
    # A name gives the heads (12 for B/16), which a width of 32 cannot be split into: the error says so.
    with pytest.raises(CheckpointError, match="width=32 must be divisible by num_heads=12"):
        vitlab.load(ref.state_dict(), format="timm", model="ViT-B/16")


def test_a_name_gives_the_heads_and_the_shapes_give_depth_width_and_mlp(caplog: pytest.LogCaptureFixture) -> None:
    """A 2-block ViT-S/16 (a truncated model): the name says 6 heads, which the fused qkv weight cannot tell;
    depth, width and MLP size come from the weights, and the logits are timm's."""
    ref = timm_vit(img_size=32, patch_size=16, embed_dim=384, depth=2, num_heads=6, mlp_ratio=4.0)
    with caplog.at_level("WARNING"):
        model = vitlab.load(ref.state_dict(), format="timm", model="ViT-S/16")
    cfg = model.config
    assert (cfg.depth, cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.image_hw) == (2, 384, 1536, 6, (32, 32))
    assert "depth=2 (not 12)" in caplog.text  # the one difference from ViT-S/16 is reported
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


def test_heads_are_never_guessed(tmp_path: Path) -> None:
    ref = timm_vit(img_size=16, patch_size=4)
    with pytest.raises(CheckpointError, match="num_heads"):
        vitlab.load(ref.state_dict(), format="timm")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(class_token=False, global_pool="avg"), "fc_norm"),  # timm's default GAP normalises after pooling
        (dict(reg_tokens=2), "register tokens"),
        (dict(pre_norm=True), "norm_pre"),
        (dict(init_values=1e-5), "layer scale"),
    ],
)
def test_features_outside_the_paper_are_refused(kwargs: dict, words: str) -> None:
    ref = timm_vit(img_size=16, patch_size=4, **kwargs)
    with pytest.raises(CheckpointError, match=words):
        vitlab.load(ref.state_dict(), format="timm", model={"num_heads": 2})


def test_pickle_offered_as_weights_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": Path("not-a-tensor")}, tmp_path / "evil.pth")  # needs a full unpickler to read
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights-only.*PosixPath") as e:
        vitlab.load(tmp_path / "evil.pth", format="timm", model="ViT-B/16")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 256)) * 8)
    with pytest.raises(CheckpointError, match=r"noise\.pt: not a torch\.save file") as noise:
        vitlab.load(tmp_path / "noise.pt", format="timm", model="ViT-B/16")
    # torch's own message suggests retrying with weights_only=False (running the file's code): never passed on.
    for error in (e.value, noise.value):
        assert "weights_only=False" not in str(error) and "Re-running" not in str(error)


def test_truncated_torch_file_is_refused(tmp_path: Path) -> None:
    ref = timm_vit(img_size=16, patch_size=4)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth"):
        vitlab.load(tmp_path / "cut.pth", format="timm", model={"num_heads": 2})


def test_pre_logits_cannot_be_written_to_timm(tmp_path: Path) -> None:
    cfg = ViTConfig(image_size=16, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3,
                    representation_size=8)
    with pytest.raises(ValueError, match="pre-logits"):
        vitlab.save(VisionTransformer(cfg), tmp_path / "w.safetensors", format="timm")
    assert not (tmp_path / "w.safetensors").exists()


def test_hybrid_epsilons_are_timms_and_measurably_not_the_official_ones() -> None:
    import dataclasses

    ref = timm_hybrid()
    with torch.no_grad():
        stem = ref.patch_embed.backbone.stem.conv.weight
        stem.mul_(1e-4 / stem.std())  # a kernel variance near the standardisation epsilon
    model = vitlab.load(ref.state_dict(), format="timm", model={"num_heads": 2})
    official = model.config.replace(backbone=dataclasses.replace(model.config.backbone, ws_eps=1e-5,
                                                                 ws_eps_in_sqrt=False, gn_eps=1e-6))
    other = vitlab.load(ref.state_dict(), format="timm", model=official)
    x = 1e-3 * torch.randn(2, 3, 32, 32)  # small activations, so the GroupNorm epsilon matters too
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
        assert (other(x) - expected).abs().max() > 1e-3


def test_legacy_torch_format_is_read_weights_only(tmp_path: Path) -> None:
    ref = timm_vit(img_size=16, patch_size=4)
    torch.save(ref.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # no mmap possible
    model = vitlab.load(tmp_path / "old.pth", format="timm", model={"num_heads": 2})
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=0)
