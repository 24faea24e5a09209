"""Training and evaluation transforms (torchvision.transforms.v2), per image and per batch.

The paper trains with inception crop and horizontal flip and scales pixels to [-1, 1] (the official input
convention). The small-data recipe adds RandAugment and mixup/cutmix (DeiT). For datasets held in memory the same
augmentations run on whole uint8 batches: one ``roi_align`` call does every image's random crop and resize at once,
so on a CPU the cores stay busy with the model instead of per-image Python.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Callable, Iterator

import torch
from torchvision.transforms import v2

# name -> (mean, std) applied to pixels in [0, 1].
NORMALIZATIONS = {
    "official": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1], the official JAX checkpoints' input scaling
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

GLOBAL_RNG_LOCK = threading.Lock()
"""Held while torch's process-wide CPU generator is seeded: by :func:`seeded_global_rng` and by the training step's
per-step re-seeding, so a loader thread (``Prefetch``) and the step never interleave their seeding."""


def _new_lock_in_child() -> None:
    # A DataLoader worker forked while another thread held the lock would inherit it held, and wait forever.
    global GLOBAL_RNG_LOCK
    GLOBAL_RNG_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run torchvision's random transforms, which draw from the global CPU generator, from ``seed``, and leave the
    caller's generator state as it was (reproducible augmentation whatever else the process draws)."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def resolve_normalize(kind: str) -> str:
    """``auto`` -> ``official``: vitlab's models (and their initialisation) follow the official [-1, 1] input."""
    kind = "official" if kind == "auto" else kind
    if kind not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {kind!r}; expected one of {sorted(NORMALIZATIONS)} or 'auto'")
    return kind


def normalize_uint8(x: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> normalised float32."""
    mean, std = NORMALIZATIONS[resolve_normalize(kind)]
    mean_t = torch.tensor(mean).view(3, 1, 1) * 255.0
    std_t = torch.tensor(std).view(3, 1, 1) * 255.0
    return (x.float() - mean_t) / std_t


def train_transform(image_size: int, *, crop: str = "inception", crop_scale: tuple[float, float] = (0.08, 1.0),
                    crop_pad: int = 4, hflip: bool = True, randaugment_n: int = 0, randaugment_m: int = 9,
                    normalize: str = "official") -> v2.Compose:
    """Per-image training transform for a PIL image: crop, flip, RandAugment, then a normalised float tensor."""
    ops: list = [v2.ToImage()]
    if crop == "inception":
        ops.append(v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True))
    elif crop == "pad":
        ops += [v2.Resize((image_size, image_size), antialias=True),
                v2.RandomCrop(image_size, padding=crop_pad, padding_mode="reflect")]
    else:
        ops.append(v2.Resize((image_size, image_size), antialias=True))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if randaugment_n:
        ops.append(v2.RandAugment(num_ops=randaugment_n, magnitude=randaugment_m))
    mean, std = NORMALIZATIONS[resolve_normalize(normalize)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def eval_transform(image_size: int, normalize: str = "official") -> v2.Compose:
    """Resize to the model's resolution (as the official evaluation, no centre crop) and normalise."""
    mean, std = NORMALIZATIONS[resolve_normalize(normalize)]
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def random_crop_boxes(n: int, size: int, *, crop: str, scale: tuple[float, float], pad: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Boxes (n, 5) = (batch index, x0, y0, x1, y1) in pixel coordinates of a (size x size) image.

    ``inception``: area fraction in ``scale``, aspect ratio in [3/4, 4/3] (log-uniform), as RandomResizedCrop
    (without its retry loop: sides are clamped to the image instead). ``pad``: a size x size window shifted by up
    to ``pad`` pixels (the area outside is the padded border).
    """
    if crop == "inception":
        area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator) * size * size
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(1.0, size)
        h = (area / ratio).sqrt().clamp(1.0, size)
        x0 = torch.rand(n, generator=generator) * (size - w)
        y0 = torch.rand(n, generator=generator) * (size - h)
    elif crop == "pad":
        x0 = torch.randint(-pad, pad + 1, (n,), generator=generator).float()
        y0 = torch.randint(-pad, pad + 1, (n,), generator=generator).float()
        w = h = torch.full((n,), float(size))
    else:
        raise ValueError(f"unknown crop {crop!r}")
    return torch.stack([torch.arange(n, dtype=torch.float32), x0, y0, x0 + w, y0 + h], dim=1)


class BatchAugment:
    """Training augmentation of whole uint8 batches (B, 3, S, S) -> normalised float (B, 3, size, size).

    All randomness comes from the ``generator`` argument, so a batch's augmentation is a function of the seed
    it is given: a resumed run and a run split over processes see the same pixels.
    """

    def __init__(self, image_size: int, *, crop: str = "inception", crop_scale: tuple[float, float] = (0.08, 1.0),
                 crop_pad: int = 4, hflip: bool = True, randaugment_n: int = 0, randaugment_m: int = 9,
                 normalize: str = "official", randaugment_group: int = 8) -> None:
        self.size = image_size
        self.crop, self.crop_scale, self.crop_pad = crop, crop_scale, crop_pad
        self.hflip = hflip
        self.randaugment = v2.RandAugment(num_ops=randaugment_n, magnitude=randaugment_m) if randaugment_n else None
        # v2.RandAugment draws one op per call; calling it on small groups gives images different ops at a
        # fraction of the per-image cost.
        self.group = randaugment_group
        self.normalize = normalize

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from torchvision.ops import roi_align

        B, _, S, _ = x.shape
        if self.crop in ("inception", "pad"):
            if self.crop == "pad":
                xf = torch.nn.functional.pad(x.float(), [self.crop_pad] * 4, mode="reflect")
                boxes = random_crop_boxes(B, S, crop="pad", scale=self.crop_scale, pad=self.crop_pad,
                                          generator=generator)
                boxes[:, 1:] += self.crop_pad
            else:
                xf = x.float()
                boxes = random_crop_boxes(B, S, crop="inception", scale=self.crop_scale, pad=0, generator=generator)
            # aligned=True samples bin centres, so an unscaled integer shift (the "pad" crop) is an exact copy.
            ratio = 1 if self.crop == "pad" and S == self.size else 2
            x = roi_align(xf, boxes, (self.size, self.size), spatial_scale=1.0, sampling_ratio=ratio,
                          aligned=True)  # B, 3, size, size
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        elif S != self.size:
            x = v2.functional.resize(x, [self.size, self.size], antialias=True)
        if self.hflip:
            flip = torch.rand(B, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.randaugment is not None:
            # v2 transforms draw from the global RNG: seed it from our generator so the result stays reproducible.
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            with seeded_global_rng(seed):
                x = torch.cat([self.randaugment(chunk) for chunk in x.split(self.group)])
        return normalize_uint8(x, self.normalize)


def make_mix(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
             mix_prob: float = 1.0) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple] | None:
    """Batch mixing with torchvision's v2.MixUp / v2.CutMix (one of them per batch when both are on).

    Returns ``fn(images, labels, generator) -> (images, soft_targets)`` or None when both are off.
    """
    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def apply(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        use = float(torch.rand(1, generator=generator)) < mix_prob
        if not use:
            return images, torch.nn.functional.one_hot(labels, num_classes).float()
        with seeded_global_rng(seed):
            return mix(images, labels)

    return apply
