"""FLOP counter: a hand computation for a tiny config, and torch's FlopCounterMode as an independent reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitlab.bench.flops import count_flops, flops_breakdown, matmul_shapes, measure_flops
from vitlab.bench.models import cifar_config
from vitlab.model import ResNetConfig, ViTConfig, VisionTransformer, create_model
from vitlab.model.config import config_from_name

TINY = ViTConfig(image_size=8, patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16, num_classes=5)


def test_tiny_config_matches_hand_computation() -> None:
    # N = (8/4)^2 = 4 patches, T = 5 tokens with the class token, D = 8, M = 16, L = 2, K = 5; multiply-add = 2.
    hand = {
        "embed": 2 * 4 * (3 * 4 * 4) * 8,  # 3072
        "qkv": 2 * (2 * 5 * 8 * 24),  # 3840
        "attn_scores": 2 * (2 * 5 * 5 * 8),  # 800
        "attn_values": 2 * (2 * 5 * 5 * 8),  # 800
        "attn_proj": 2 * (2 * 5 * 8 * 8),  # 1280
        "mlp": 2 * (2 * 5 * 8 * 16 * 2),  # 5120
        "head": 2 * 8 * 5,  # 80
    }
    assert flops_breakdown(TINY) == hand
    assert count_flops(TINY) == 14992


def test_vit_b16_is_the_known_17_6_gmacs() -> None:
    # ViT-B/16 at 224 is widely quoted as 17.6 GMACs (timm, fvcore); 2 FLOPs per MAC.
    assert count_flops(config_from_name("ViT-B/16")) / 2e9 == pytest.approx(17.56, abs=0.01)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        TINY.replace(classifier="gap", representation_size=6, image_size=(8, 12)),
        TINY.replace(num_classes=0, pos_embed="sincos-2d"),
        ViTConfig(image_size=64, patch_size=1, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3,
                  backbone=ResNetConfig(layers=(1, 1), width_factor=0.5, num_groups=8)),
        ViTConfig(image_size=(40, 56), patch_size=2, width=32, depth=1, num_heads=4, mlp_dim=64, num_classes=3,
                  backbone=ResNetConfig(layers=(2,), width_factor=0.25, num_groups=4)),
    ],
    ids=["token", "gap-prelogits-rect", "no-head", "hybrid", "hybrid-odd-sizes"],
)
def test_matches_torch_flop_counter(config: ViTConfig) -> None:
    model = VisionTransformer(config)
    assert count_flops(config) == measure_flops(model, (config.in_channels, *config.image_hw))
    assert count_flops(model) == count_flops(config)


@pytest.mark.parametrize("name", ["ViT-S/16", "R50+ViT-B/16"])
def test_named_models_match_torch_flop_counter_on_meta(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert count_flops(model.config) == measure_flops(model, (3, 224, 224))


def test_generic_module_by_hand() -> None:
    # conv 3->4, 3x3, stride 1, no padding on 6x6 -> 4x4: 2*16*4*27 = 3456; linear 64->10: 2*640 = 1280.
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 10))
    assert count_flops(net, (3, 6, 6)) == 3456 + 1280


def test_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="ViTConfig or an nn.Module"):
        count_flops("ViT-B/16")  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [TINY, TINY.replace(classifier="gap", representation_size=6, image_size=(8, 12)),
                                    config_from_name("ViT-S/16"), config_from_name("ViT-B/16"), cifar_config()],
                         ids=["token", "gap-prelogits-rect", "S/16", "B/16", "cifar"])
def test_matmul_shapes_hold_every_counted_flop(config: ViTConfig) -> None:
    """The matmul list the GEMM-ceiling script times carries exactly the FLOPs the counter (checked above against
    torch's FlopCounterMode) gives, for any batch."""
    for batch in (1, 3):
        listed = sum(2 * count * b * m * k * n for count, b, m, k, n in matmul_shapes(config, batch))
        assert listed == count_flops(config) * batch
    with pytest.raises(ValueError, match="plain ViTs only"):
        matmul_shapes(config_from_name("R50+ViT-B/16"), 1)
