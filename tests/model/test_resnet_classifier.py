"""The standalone BiT ResNet classifier: names, parameter counts against torchvision/timm, stages, 32-px input,
config serialisation."""

from __future__ import annotations

import pytest
import torch

from vitlab.model import (
    ResNetClassifier,
    ResNetClassifierConfig,
    config_from_json,
    count_parameters,
    create_model,
    model_from_config,
)


# torchvision's ResNet-v1.5 has the same convolutions (stride on the 3x3) and one affine norm after each, so the
# post-activation GroupNorm ResNet has exactly its parameter count.
@pytest.mark.parametrize("name,tv_name", [("ResNet-50", "resnet50"), ("ResNet-101", "resnet101")])
def test_parameter_count_equals_torchvision(name: str, tv_name: str) -> None:
    import torchvision

    with torch.device("meta"):
        reference = getattr(torchvision.models, tv_name)()
    assert count_parameters(name) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name,timm_name", [("ResNet-50x3", "resnetv2_50x3_bit"),
                                            ("ResNet-152x2", "resnetv2_152x2_bit")])
def test_width_multiplier_convolutions_equal_timm_bit(name: str, timm_name: str) -> None:
    """BiT's xN widens every layer, root included: the convolution kernels equal timm's BiT ResNet-v2 (which only
    places its norms differently, pre-activation, and has a 1x1-conv head)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(timm_name, pretrained=False)
    def kernels(m: torch.nn.Module) -> list[torch.Size]:
        return [p.shape for n, p in m.named_parameters() if p.ndim == 4 and not n.startswith("head")]

    assert kernels(ours) == kernels(theirs)
    assert ours.head.weight.shape == theirs.head.fc.weight.shape[:2]


def test_stages_compose_and_head_is_zero_at_init() -> None:
    model = create_model("ResNet-26", num_classes=7, image_size=32, width_factor=0.25, num_groups=8).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 2048 // 4, 1, 1) and model.config.grid_size == (1, 1)
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, features.mean(dim=(2, 3)))
    assert torch.count_nonzero(model(x)) == 0  # zero-initialised head, as BiT
    with torch.no_grad():
        model.head.weight.normal_()
    torch.testing.assert_close(model(x), pooled @ model.head.weight.T + model.head.bias)
    torch.testing.assert_close(model.backbone(x), features)


def test_larger_input_gives_larger_map_and_trains() -> None:
    model = create_model("ResNet-26", num_classes=3, image_size=64, width_factor=0.25, num_groups=8)
    assert model.config.grid_size == (2, 2)
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_config_round_trips_through_json_and_names_are_checked() -> None:
    with torch.device("meta"):
        cfg = create_model("ResNet-50x2", num_classes=10, image_size=32).config
    assert cfg.backbone.layers == (3, 4, 6, 3) and cfg.backbone.root_width == 128 and cfg.width == 4096
    again = config_from_json(cfg.to_json(), type(cfg).__name__)
    with torch.device("meta"):
        assert again == cfg and isinstance(model_from_config(again), ResNetClassifier)
    assert ResNetClassifierConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="known names"):
        create_model("ResNet-34")
    with pytest.raises(ValueError, match="known names"):
        create_model("ResNet-50x1")  # the canonical name has no x1
    with pytest.raises(ValueError, match="unknown ResNetClassifierConfig field"):
        create_model("ResNet-26", patch_size=4)
    with pytest.raises(ValueError, match="in_channels"):
        ResNetClassifier(ResNetClassifierConfig(in_channels=0))
    headless = ResNetClassifier(cfg.replace(num_classes=0, width_factor=0.25, num_groups=8))
    assert isinstance(headless.head, torch.nn.Identity) and headless.config.backbone.root_width == 16
