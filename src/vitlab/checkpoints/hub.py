"""Hub loading: ``vitlab.load("hf-hub:google/vit-base-patch16-224")`` or
``vitlab.load("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")`` through ``huggingface_hub``.

The repo's ``config.json`` says the format (``model_type: vit`` for transformers, ``architecture`` for timm);
the weights (``model.safetensors``, else ``pytorch_model.bin`` read weights-only) come next. Files are served
from the local cache when present; ``HF_HUB_OFFLINE=1`` (read at call time) forbids the network, and a file
missing from the cache then raises an error naming the repo, the file and how to make it available.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitlab.checkpoints.strict import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself reads it once, at import)."""
    import huggingface_hub.constants as constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default (read at call time)."""
    import huggingface_hub.constants as constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _download(repo: str, filename: str, revision: str | None) -> Path | None:
    """The local path of ``filename`` in ``repo`` (None if the repo has no such file)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = is_offline()
    cache = cache_dir()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
        why = "HF_HUB_OFFLINE is set" if offline else "it could not be downloaded (no network?)"
        raise CheckpointError(
            f"hf-hub:{repo}: file {filename!r} is not in the local cache {cache} and {why}. Make it available with "
            f"`hf download {repo} {filename}` on a machine with network access (then copy the cache folder, or "
            f"point HF_HUB_CACHE at it), or unset HF_HUB_OFFLINE"
        ) from None
    except EntryNotFoundError:
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"hf-hub:{repo}: repository or revision not found ({type(e).__name__})") from None


def resolve_hub(spec: str, format: str | None = None) -> tuple[Path, str]:
    """(local snapshot directory holding config.json and weights, format) for ``"org/name[@revision]"``."""
    from vitlab.checkpoints.hf import read_config_json

    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1:
        raise CheckpointError(f"hf-hub:{spec}: expected 'hf-hub:<owner>/<name>[@revision]'")
    config_path = _download(repo, "config.json", revision or None)
    if config_path is None:
        raise CheckpointError(f"hf-hub:{repo}: the repository has no config.json, so its format is unknown")
    config = read_config_json(config_path)
    if format is None:
        if config.get("model_type") == "vit":
            format = "hf"
        elif "architecture" in config:
            format = "timm"
        else:
            raise CheckpointError(f"hf-hub:{repo}: config.json is neither a transformers ViT (model_type "
                                  f"{config.get('model_type')!r}) nor a timm config (no 'architecture')")
    first_error: CheckpointError | None = None
    for name in WEIGHT_FILES:
        try:
            path = _download(repo, name, revision or None)
        except CheckpointError as e:  # not cached: another weights file may be
            first_error = first_error or e
            continue
        if path is not None:
            if path.parent != config_path.parent:
                raise CheckpointError(f"hf-hub:{repo}: config.json and {name} resolved to different snapshots")
            return config_path.parent, format
    if first_error is not None:
        raise first_error
    raise CheckpointError(f"hf-hub:{repo}: the repository has config.json but none of {WEIGHT_FILES}")
