"""The assembled model: names, sizes, errors, stages, attention maps, resolution changes, init and gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import vitlab
from vitlab.model import fast
from vitlab.model.posembed import resample_pos_embed
from vitlab.model import ViTConfig, VisionTransformer, count_parameters, create_model, list_models

TINY = dict(image_size=32, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=5)


def tiny(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():  # no zeros anywhere, so every path shows up in the output
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# Parameter counts of the widely used implementations (timm / the official checkpoints) at 1000 classes.
@pytest.mark.parametrize("name,count", [
    ("ViT-B/16", 86_567_656), ("ViT-L/16", 304_326_632), ("ViT-H/14", 632_045_800), ("ViT-B/32", 88_224_232),
    ("ViT-S/16", 22_050_664), ("ViT-Ti/16", 5_717_416), ("R50+ViT-B/16", 98_659_112),
])
def test_parameter_counts(name: str, count: int) -> None:
    assert count_parameters(name) == count


def test_every_listed_name_builds() -> None:
    names = list_models()
    assert len(names) == 5 * 4 + 4 + 4 * 4 and "ViT-H/14" in names and "R26+ViT-S/32" in names
    assert {"ResNet-26", "ResNet-50", "ResNet-50x2", "ResNet-26x2", "ResNet-152x4"} <= set(names)
    for name in names:
        cfg = vitlab.model.config_from_name(name)
        if isinstance(cfg, vitlab.model.ResNetClassifierConfig):
            assert cfg.grid_size == (7, 7)  # stride 32 at 224, as every 4-stage ResNet
            continue
        assert cfg.grid_size[0] * cfg.effective_patch_hw[0] == 224
    hybrid = vitlab.model.config_from_name("R50+ViT-L/32")
    assert hybrid.backbone.layers == (3, 4, 6, 3) and hybrid.grid_size == (7, 7) and hybrid.width == 1024


def test_bad_names_and_overrides_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="known names: ViT-Ti/8"):
        create_model("ViT-X/16")
    with pytest.raises(ValueError, match="known names"):
        create_model("ViT-B/12")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        create_model("ViT-B/16", num_heads=7)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        create_model("ViT-B/16", image_size=230)
    with pytest.raises(ValueError, match="unknown override"):
        create_model("ViT-B/16", hidden=3)
    with pytest.raises(ValueError, match="classifier='cls' \\(expected 'token' \\| 'gap'\\)"):
        ViTConfig(**{**TINY, "classifier": "cls"})
    with pytest.raises(ValueError, match="width='32' \\(expected int\\); qkv_bias=1 \\(expected bool\\)"):
        ViTConfig(**{**TINY, "width": "32", "qkv_bias": 1})


def test_stages_compose_to_forward() -> None:
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 64, 32)
    torch.testing.assert_close(model.forward_head(tokens), model(x))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    inter = model.intermediates(x)
    torch.testing.assert_close(inter["logits"], model(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(inter["encoded"], tokens, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", [p for p in fast.PATHS if fast.available(p)])
def test_forward_computes_the_last_block_for_the_class_token_only(path: str) -> None:
    model = tiny(representation_size=8)
    x = torch.randn(3, 3, 32, 32)
    seen = []
    hook = model.blocks[-1].mlp.fc1.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with fast.use(path), torch.no_grad():
        logits, full = model(x), model.forward_head(model.forward_features(x))
        h = model.blocks[0](model.embed(x))
        rows, every = model.blocks[1](h, queries=1), model.blocks[1](h)
    hook.remove()
    if path != "avx512-bf16":  # the fused oneDNN path calls no module (and so no hook)
        assert seen[0] == (3, 1, 32)  # the last block's MLP ran on one token per image
    assert rows.shape == (3, 1, 32)
    torch.testing.assert_close(rows, every[:, :1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, full, atol=1e-6, rtol=1e-5)
    # Training: the same loss and the same gradient for every parameter (the skipped rows receive none).
    model.train()
    with fast.use(path):
        grads = [torch.autograd.grad(f(x).logsumexp(-1).sum(), list(model.parameters()))
                 for f in (model, lambda x: model.forward_head(model.forward_features(x)))]
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    qkv_grad = dict(zip([n for n, _ in model.named_parameters()], grads[0]))["blocks.1.attn.qkv.weight"]
    assert all(torch.count_nonzero(part) == part.numel() for part in qkv_grad.chunk(3))  # q, k and v all learn


def test_attention_maps_are_the_softmax_the_fast_path_computes() -> None:
    model = tiny()
    x = torch.randn(2, 3, 32, 32)
    maps = model.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (2, 4, 65, 65)
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 65), atol=1e-5, rtol=0)
    # Layer 0 by hand from the embedded tokens: softmax(q k^T / sqrt(d)).
    h = model.embed(x)
    blk = model.blocks[0]
    qkv = blk.attn.qkv(blk.norm1(h)).reshape(2, 65, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / np.sqrt(8), dim=-1)
    torch.testing.assert_close(maps[0], ref, atol=1e-6, rtol=0)


def test_gap_and_token_heads_differ_only_in_pooling() -> None:
    token, gap = tiny(), tiny(classifier="gap")
    assert gap.cls_token is None and gap.pos_embed.shape == (1, 64, 32)
    assert token.pos_embed.shape == (1, 65, 32)
    tokens = torch.randn(2, 65, 32)
    torch.testing.assert_close(gap.forward_head(tokens, pre_logits=True), tokens.mean(1))
    torch.testing.assert_close(token.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert gap.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 32)


def test_set_image_size_to_same_size_is_identity() -> None:
    model = tiny()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    pos = model.pos_embed.detach().clone()
    model.set_image_size(32)
    assert torch.equal(model.pos_embed, pos)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_set_image_size_non_square_and_back_to_size() -> None:
    model = tiny()
    model.set_image_size((48, 32))
    assert model.config.grid_size == (12, 8) and model.pos_embed.shape == (1, 1 + 96, 32)
    assert model(torch.randn(1, 3, 48, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"\(B, 3, 48, 32\)"):
        model(torch.randn(1, 3, 32, 32))


def test_resample_bilinear_align_corners_by_hand() -> None:
    # 2x2 grid -> 3x3 with aligned corners: corners kept, edge midpoints and centre are averages.
    grid = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).reshape(1, 4, 1)
    pe = torch.cat([torch.full((1, 1, 1), -1.0), grid], dim=1)
    out = resample_pos_embed(pe, (3, 3), (2, 2))
    expected = torch.tensor([-1.0, 0, 1, 2, 2, 3, 4, 4, 5, 6]).reshape(1, 10, 1)
    torch.testing.assert_close(out, expected)
    cubic = resample_pos_embed(pe, (3, 3), (2, 2), mode="bicubic")
    assert cubic[0, 0, 0] == -1.0 and cubic.shape == (1, 10, 1)
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(torch.zeros(1, 1 + 6, 2), (4, 4))


@pytest.mark.parametrize("kind", ["learned-2d", "sincos-2d", "none"])
def test_other_position_embeddings(kind: str) -> None:
    model = tiny(pos_embed=kind)
    x = torch.randn(1, 3, 32, 32)
    assert model(x).shape == (1, 5)
    pos = model.position_embedding()
    if kind == "none":
        assert pos is None and not any("pos_embed" in n for n, _ in model.named_parameters())
        return
    assert pos.shape == (1, 64, 32)
    if kind == "learned-2d":
        # Same row -> same first half; same column -> same second half.
        grid = pos.reshape(8, 8, 32)
        torch.testing.assert_close(grid[2, 0, :16], grid[2, 7, :16])
        torch.testing.assert_close(grid[0, 3, 16:], grid[5, 3, 16:])
    else:
        # big_vision's posemb_sincos_2d at (y=1, x=2): [sin(x w), cos(x w), sin(y w), cos(y w)].
        omega = 1.0 / 10000 ** (np.arange(8) / 7)
        ref = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
        np.testing.assert_allclose(pos[0, 1 * 8 + 2].numpy(), ref, atol=1e-6)
    model.set_image_size(48)
    assert model.position_embedding().shape == (1, 144, 32)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_position_free_model_is_permutation_invariant() -> None:
    model = tiny(pos_embed="none", patch_size=16)  # 2x2 grid of 16-pixel patches
    x = torch.randn(1, 3, 32, 32)
    swapped = x.clone()
    swapped[..., :16, :16], swapped[..., 16:, 16:] = x[..., 16:, 16:], x[..., :16, :16]
    torch.testing.assert_close(model(x), model(swapped), atol=1e-5, rtol=0)
    with_pos = tiny(patch_size=16)
    assert not torch.allclose(with_pos(x), with_pos(swapped), atol=1e-4)


def test_official_initialisation() -> None:
    torch.manual_seed(0)
    model = create_model("ViT-S/16", num_classes=10)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.cls_token) == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.abs().max().item() - np.sqrt(6 / (384 + 1536))) < 1e-3  # Xavier-uniform bound
    q = model.blocks[0].attn.qkv.weight[:384]
    assert q.abs().max().item() <= np.sqrt(6 / 768) + 1e-6
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_gradients_reach_every_parameter() -> None:
    for overrides in ({}, {"representation_size": 8}, {"classifier": "gap", "pos_embed": "learned-2d"},
                      {"patch_size": 1, "backbone": vitlab.ResNetConfig(layers=(1, 1), width_factor=0.5)}):
        model = tiny(**overrides).train()
        loss = model(torch.randn(2, 3, 32, 32)).square().sum()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
        assert not missing, (overrides, missing)


def test_config_json_round_trip() -> None:
    cfg = vitlab.model.config_from_name("R50+ViT-B/16", image_size=(384, 320), num_classes=7)
    back = ViTConfig.from_json(cfg.to_json())
    assert back == cfg and back.image_hw == (384, 320) and back.backbone.layers == (3, 4, 9)


def test_state_dict_keys_follow_the_de_facto_names() -> None:
    keys = set(tiny().state_dict())
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight",
              "blocks.1.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "head.bias"):
        assert k in keys


def test_import_is_torch_only_and_subpackages_load_on_access() -> None:
    import subprocess
    import sys

    code = ("import sys, vitlab; heavy = {'matplotlib', 'timm', 'transformers', 'onnx', 'tensorboard', 'scipy'}; "
            "assert not heavy & {m.split('.')[0] for m in sys.modules}, sorted(heavy & set(sys.modules)); "
            "assert 'vitlab.analysis' not in sys.modules; "
            "assert callable(vitlab.analysis.attention_rollout) and callable(vitlab.load)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", ["learned-1d", "learned-2d", "sincos-2d"])
def test_interpolated_position_embedding_equals_a_resized_copy(kind) -> None:
    # Another resolution with interpolate_pos_embed=True must compute what a copy with the table resized to the
    # new grid computes, while the stored parameters keep the model's own grid and receive the gradient.
    from vitlab.model.vit import sincos_2d

    torch.manual_seed(0)
    model = vitlab.create_model("ViT-Ti/16", num_classes=5, image_size=32, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64, pos_embed=kind).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # non-zero head and embeddings, so a wrong embedding shows in the logits
    x = torch.randn(2, 3, 24, 24)
    resized = copy.deepcopy(model)
    resized.set_image_size(24)
    if kind == "sincos-2d":
        # set_image_size recomputes the sin-cos table for the new grid; sampling interpolates the 8x8 one.
        sampled = resample_pos_embed(sincos_2d((8, 8), 32), (6, 6), (8, 8), num_prefix_tokens=0)
        resized.register_buffer("pos_embed_fixed", sampled, persistent=False)
    out = model(x, interpolate_pos_embed=True)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, resized(x), rtol=1e-5, atol=1e-5)
    assert model.config.image_hw == (32, 32)
    if kind == "learned-1d":
        out.sum().backward()
        assert model.pos_embed.shape == (1, 1 + 64, 32) and model.pos_embed.grad.abs().sum() > 0
    full = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(full, interpolate_pos_embed=True), model(full))


def test_other_resolutions_need_the_flag_and_a_multiple_of_the_patch() -> None:
    model = vitlab.create_model("ViT-Ti/16", num_classes=5, image_size=32, patch_size=4, width=32, depth=1,
                                num_heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="interpolate_pos_embed=True"):
        model(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="26x26 pixels is not a multiple of the 4x4 patch"):
        model(torch.randn(1, 3, 26, 26), interpolate_pos_embed=True)
