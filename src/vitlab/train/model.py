"""The model of a run: built fresh or from a checkpoint to fine-tune (paper Sec. 3.2), placed on the run's
processes (DistributedDataParallel, or FSDP2 ``fully_shard`` per block), and its full state gathered back for
checkpoints and the final weights."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vitlab.data.loaders import derive_seed
from vitlab.model import VisionTransformer
from vitlab.train.config import TrainConfig
from vitlab.train.distributed import Dist
from vitlab.train.optim import EMA


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """A fresh ``create_model`` model, or (``config.init``) a checkpoint loaded at the run's resolution with a
    fresh zero-initialised head of ``num_classes`` outputs (paper Sec. 3.2)."""
    import vitlab

    if not config.init:
        model = vitlab.create_model(config.model, num_classes=num_classes, image_size=config.image_size,
                                    **config.model_overrides)
        if config.attention_init == "mimetic":
            from vitlab.train.init import mimetic_attention_init_

            mimetic_attention_init_(model, generator=torch.Generator().manual_seed(derive_seed(config.seed, 6)))
        return model
    kwargs: dict[str, Any] = {"image_size": config.image_size, "num_classes": num_classes}
    if config.init_format:
        kwargs["format"] = config.init_format
    model = vitlab.load(config.init, drop_pre_logits=config.init_drop_pre_logits, **kwargs)
    if config.model_overrides:
        # Regularisation changes (dropout, drop_path) do not change parameters: rebuild and copy the weights.
        tuned = VisionTransformer(model.config.replace(**config.model_overrides))
        tuned.load_state_dict(model.state_dict())
        model = tuned
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
    return model


def uses_fsdp(config: TrainConfig, d: Dist) -> bool:
    return d.world > 1 and config.distributed == "fsdp"


def shard(model: nn.Module) -> None:
    """FSDP2: each block, then the rest, sharded over the processes."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    fully_shard(model)


def data_parallel(model: nn.Module, d: Dist) -> nn.Module:
    """The module the steps run: ``model`` itself, or wrapped in DistributedDataParallel over the processes."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(model, optimiser) state dicts, whole and on the CPU; a collective under FSDP."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return ({k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, optimizer.state_dict())


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """The inverse of :func:`full_state`, from a checkpoint's ``model`` and ``optimizer`` entries."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
        return
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])


def weights_copy(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, *, config: TrainConfig,
                 num_classes: int, fsdp: bool, d: Dist) -> nn.Module | None:
    """A whole CPU copy of the current weights (EMA applied), on rank 0 (None elsewhere); a collective under
    FSDP, so every rank calls it."""
    state = full_state(model, optimizer, fsdp)[0] if fsdp else None
    if not d.main:
        return None
    if fsdp:
        weights = build_model(config, num_classes)
        weights.load_state_dict(state)
    else:
        weights = copy.deepcopy(unwrap(model)).cpu()
    if ema is not None:
        ema.copy_to(weights)
    return weights
