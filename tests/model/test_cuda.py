"""The model on a CUDA device: the official JAX outputs reproduced there (fp32), and bf16 (autocast and bf16
weights) and ``torch.compile`` staying within their tolerances of them. Skipped where no GPU is visible; run on a
GPU machine with ``pytest -m cuda`` (scripts/gpu_check.sh)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from tests.model.test_official_parity import CASES, build, fixture

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    # TF32 matmuls and convolutions (cuDNN's default for convolutions) round to 10 mantissa bits: not fp32.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def relative_error(a: torch.Tensor, b: np.ndarray) -> float:
    ref = torch.from_numpy(b).double()
    return float((a.detach().double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", list(CASES))
def test_official_outputs_on_cuda_fp32(name: str) -> None:
    model, _ = build(name, **CASES[name])
    fx = fixture(name)
    model = model.cuda()
    x = torch.from_numpy(fx["inputs_nchw"]).cuda()
    with torch.no_grad():
        out = model.intermediates(x)
        logits = model(x)
    np.testing.assert_allclose(logits.cpu().numpy(), fx["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pre_logits"].cpu().numpy(), fx["pre_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["encoded"].cpu().numpy(), fx["encoded"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("how", ["autocast", "bf16-weights"])
def test_official_outputs_on_cuda_bf16(name: str, how: str) -> None:
    """bf16 keeps 8 mantissa bits: the logits land within a few percent of the official fp32 ones (on the CPU,
    0.5-2% under autocast and up to 3.6% with bf16 weights, the hybrid's ResNet the furthest); a layout or
    indexing error would be off by order one."""
    model, _ = build(name, **CASES[name])
    fx = fixture(name)
    model = model.cuda()
    x = torch.from_numpy(fx["inputs_nchw"]).cuda()
    with torch.inference_mode():
        if how == "autocast":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x)
        else:
            logits = model.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits.float(), fx["logits"]) < 6e-2


def test_compiled_model_on_cuda_matches_official() -> None:
    model, _ = build("vit_tiny_p4_32")
    fx = fixture("vit_tiny_p4_32")
    compiled = torch.compile(model.cuda())
    with torch.no_grad():
        logits = compiled(torch.from_numpy(fx["inputs_nchw"]).cuda())
    np.testing.assert_allclose(logits.cpu().numpy(), fx["logits"], atol=1e-4, rtol=0)


def test_flash_attention_backward_matches_fp64_on_cuda() -> None:
    """A bf16 training step on CUDA (autocast, SDPA's flash kernels at head dim 64): the gradients agree with an
    fp64 computation of the same loss on the CPU to bf16 precision (1.3% at most under CPU autocast)."""
    import vitlab

    torch.manual_seed(0)
    kwargs = dict(num_classes=10, image_size=64, patch_size=8, width=128, depth=2, num_heads=2, mlp_dim=256)
    model = vitlab.create_model("ViT-Ti/16", **kwargs)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the zero-initialised head would zero every other gradient
    reference = vitlab.create_model("ViT-Ti/16", **kwargs).double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 64, 64)
    y = torch.randint(0, 10, (8,))
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x.cuda()).float(), y.cuda())
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(reference(x.double()), y)
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=2e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        err = float((p.grad.double().cpu() - q.grad).norm() / q.grad.norm().clamp_min(1e-12))
        assert err < 5e-2, name


def test_autocast_inference_with_cached_weights_is_autocast_bit_for_bit() -> None:
    """CUDA autocast inference casts the Dense weights once and keeps them (``fast.block_inference``): the logits
    equal plain autocast's exactly, before and after a fused optimiser step changes the weights."""
    import vitlab
    from vitlab.model import fast

    model = vitlab.create_model("ViT-Ti/16", num_classes=10, image_size=64, patch_size=8).cuda().eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    x = torch.randn(4, 3, 64, 64, device="cuda")

    def logits(cached: bool) -> torch.Tensor:
        path = contextlib.nullcontext() if cached else fast.use("plain")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), path:
            return model(x)

    first = logits(True)
    assert model.blocks[0].attn.qkv._vitlab_cast.weight.dtype == torch.bfloat16  # the cached path ran
    assert torch.equal(first, logits(False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    after = logits(True)
    assert not torch.equal(after, first) and torch.equal(after, logits(False))
