"""The Vision Transformer (paper Sec. 3.1, Eq. 1-4) in named stages:

    embed (patches or ResNet features -> tokens, class token, position embedding)
    -> forward_features (encoder blocks, final LayerNorm)  -> (B, N, D)
    -> forward_head (pool: class token or mean; optional pre-logits Dense+tanh; linear head) -> (B, K)

``attention_maps`` and ``intermediates`` run the same weights through the explicit attention path and expose what
the fast path (``scaled_dot_product_attention``) never materialises.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitlab.model.config import ViTConfig, to_hw
from vitlab.model.layers import Block, PatchEmbed, init_official_
from vitlab.model.posembed import resample_axis_embed, resample_pos_embed
from vitlab.model.resnet import ResNetBackbone


def sincos_2d(grid: tuple[int, int], width: int, temperature: float = 10_000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, (1, gh*gw, width), as big_vision's ``posemb_sincos_2d``."""
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    y = y.flatten()[:, None] * omega[None]  # N, D/4
    x = x.flatten()[:, None] * omega[None]
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return pe[None].float()


class HybridEmbed(nn.Module):
    """ResNet feature map cut into patches (1x1 in every official hybrid) and projected to the model width."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        assert cfg.backbone is not None
        self.backbone = ResNetBackbone(cfg.backbone, cfg.in_channels)
        self.proj = nn.Conv2d(self.backbone.out_channels, cfg.width, kernel_size=cfg.patch_hw, stride=cfg.patch_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x))  # B, D, gh, gw
        return x.flatten(2).transpose(1, 2)  # B, N, D


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        D = cfg.width
        self.patch_embed: nn.Module = HybridEmbed(cfg) if cfg.backbone else PatchEmbed(cfg.patch_hw, cfg.in_channels, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.classifier == "token" else None
        gh, gw = cfg.grid_size
        if cfg.pos_embed == "learned-1d":
            # The class slot (when there is one) comes first, then the grid row-major, as the official layout.
            self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_prefix_tokens + gh * gw, D))
        elif cfg.pos_embed == "learned-2d":
            # Appendix D.4: one embedding per row and per column, D/2 each, concatenated per patch.
            self.pos_embed_row = nn.Parameter(torch.empty(1, gh, D // 2))
            self.pos_embed_col = nn.Parameter(torch.empty(1, gw, D - D // 2))
        elif cfg.pos_embed == "sincos-2d":
            self.register_buffer("pos_embed_fixed", sincos_2d((gh, gw), D), persistent=False)
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as DeiT
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.mlp_dim, qkv_bias=cfg.qkv_bias, gelu=cfg.gelu, norm_eps=cfg.norm_eps,
                  dropout=cfg.dropout, attention_dropout=cfg.attention_dropout, drop_path=rate)
            for rate in rates
        )
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.pre_logits = nn.Linear(D, cfg.representation_size) if cfg.representation_size else None
        head_in = cfg.representation_size or D
        self.head = nn.Linear(head_in, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: zero head and class token, position embedding N(0, 0.02), LeCun-normal
        patch embedding and pre-logits, Xavier-uniform encoder Dense kernels."""
        for name in ("pos_embed", "pos_embed_row", "pos_embed_col"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name), std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        proj = self.patch_embed.proj
        _lecun_normal_(proj.weight)
        nn.init.zeros_(proj.bias)
        if isinstance(self.patch_embed, HybridEmbed):
            for m in self.patch_embed.backbone.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.GroupNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            init_official_(block)
            for norm in (block.norm1, block.norm2):
                nn.init.ones_(norm.weight)
                nn.init.zeros_(norm.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.pre_logits is not None:
            _lecun_normal_(self.pre_logits.weight)
            nn.init.zeros_(self.pre_logits.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------------------------------- forward
    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def position_embedding(self, grid: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The (1, prefix + gh*gw, D) or (1, gh*gw, D) embedding added to the tokens, or None for ``"none"``.

        ``grid`` other than the model's own samples the embedding there (bilinear, aligned corners, the same
        resize as ``set_image_size``) without changing the parameters, so gradients reach the stored table. The
        sin-cos table is sampled too (the image keeps its coordinates), where ``set_image_size`` recomputes it.
        """
        kind = self.config.pos_embed
        native = self.config.grid_size
        gh, gw = native if grid is None else (int(grid[0]), int(grid[1]))
        if kind == "learned-2d":
            rows = resample_axis_embed(self.pos_embed_row, gh)[:, :, None, :].expand(-1, gh, gw, -1)  # 1,gh,gw,D/2
            cols = resample_axis_embed(self.pos_embed_col, gw)[:, None, :, :].expand(-1, gh, gw, -1)  # 1,gh,gw,D/2
            return torch.cat([rows, cols], dim=-1).reshape(1, gh * gw, -1)  # 1, N, D
        if kind == "learned-1d":
            table, prefix = self.pos_embed, self.num_prefix_tokens
        elif kind == "sincos-2d":
            table, prefix = self.pos_embed_fixed, 0
        else:
            return None
        return resample_pos_embed(table, (gh, gw), native, prefix)  # the table itself on the native grid

    def embed(self, x: torch.Tensor, *, interpolate_pos_embed: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, prefix + N, D) with position information, before the encoder.

        ``interpolate_pos_embed=True`` accepts another resolution (a multiple of the patch size) and samples the
        position embedding at its grid: training at a lower resolution than the model's (FixRes, progressive
        resizing) without touching the parameters.
        """
        grid = self._check_input(x, any_size=interpolate_pos_embed)
        x = self.patch_embed(x)  # B, N, D
        pos = self.position_embedding(grid)
        if self.config.pos_embed == "learned-1d":
            # The class token is prepended before the embedding is added, as the official code.
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + pos
        else:
            # 2D and fixed embeddings describe grid positions only; the class token carries none.
            if pos is not None:
                x = x + pos
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        # The embeddings hand over a transposed view of their (B, D, gh, gw) output. Concatenating a class token
        # makes it dense; without one (GAP) its strides would survive every residual addition, and each LayerNorm
        # and Dense layer of every block would copy it or read it transposed. A no-op where it is dense already.
        return self.pos_drop(x.contiguous())

    def forward_features(self, x: torch.Tensor, *, interpolate_pos_embed: bool = False) -> torch.Tensor:
        """Images -> encoder output after the final LayerNorm, (B, prefix + N, D)."""
        x = self.embed(x, interpolate_pos_embed=interpolate_pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the class token's state, or the mean of all tokens for ``gap``."""
        return tokens[:, 0] if self.config.classifier == "token" else tokens.mean(dim=1)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, then the pre-logits Dense+tanh (if any); with ``pre_logits=True`` stop there, else apply the head."""
        x = self.pool(tokens)
        if self.pre_logits is not None:
            x = torch.tanh(self.pre_logits(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, *, interpolate_pos_embed: bool = False) -> torch.Tensor:
        """Images -> logits. With the class-token classifier the head reads one token of the last block, so that
        block computes only the class token's row (its keys and values still come from every token): the same
        logits as ``forward_head(forward_features(x))`` with 10/12 of the last block's matmuls skipped (for
        ViT-B/16, 7% of the forward). ``forward_features`` still returns every token."""
        if self.cls_token is None or self.config.classifier != "token" or not len(self.blocks):
            return self.forward_head(self.forward_features(x, interpolate_pos_embed=interpolate_pos_embed))
        x = self.embed(x, interpolate_pos_embed=interpolate_pos_embed)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.forward_head(self.norm(self.blocks[-1](x, queries=1)))

    # ----------------------------------------------------------------------------------- explicit paths
    def intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named stage of the forward pass, computed with the explicit attention path.

        Keys: ``embedding`` (B, N, D patch tokens before class token and position embedding), ``tokens``
        (encoder input), ``block_{i}`` (B, T, D), ``attention_{i}`` (B, H, T, T), ``encoded`` (after the final
        LayerNorm), ``pre_logits`` (B, F), ``logits`` (B, K).
        """
        self._check_input(x)
        out: dict[str, torch.Tensor] = {"embedding": self.patch_embed(x)}
        h = self.embed(x)
        out["tokens"] = h
        for i, block in enumerate(self.blocks):
            h, probs = block.forward_with_probs(h)
            out[f"block_{i}"] = h
            out[f"attention_{i}"] = probs
        out["encoded"] = self.norm(h)
        out["pre_logits"] = self.forward_head(out["encoded"], pre_logits=True)
        out["logits"] = self.head(out["pre_logits"])
        return out

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B, heads, T, T) tensor of softmax probabilities per layer (T counts the class token if any).

        Computed with the same weights as ``forward``; equal to what the fast path computes internally.
        """
        h = self.embed(x)
        maps = []
        for block in self.blocks:
            h, probs = block.forward_with_probs(h)
            maps.append(probs)
        return maps

    # --------------------------------------------------------------------------------------- resolution
    def set_image_size(self, image_size: int | tuple[int, int], mode: str = "bilinear") -> None:
        """Change the input resolution, keeping the patch size: the learned position-embedding grid is resampled
        (class slot kept apart) by 2D interpolation, bilinear with aligned corners by default because that
        reproduces the official resize exactly; ``mode="bicubic"`` is available."""
        new_cfg = self.config.replace(image_size=image_size if isinstance(image_size, int) else to_hw(image_size))
        old_grid, new_grid = self.config.grid_size, new_cfg.grid_size
        kind = self.config.pos_embed
        with torch.no_grad():
            if kind == "learned-1d":
                resized = resample_pos_embed(self.pos_embed.data, new_grid, old_grid, self.num_prefix_tokens, mode)
                self.pos_embed = nn.Parameter(resized, requires_grad=self.pos_embed.requires_grad)
            elif kind == "learned-2d":
                self.pos_embed_row = nn.Parameter(resample_axis_embed(self.pos_embed_row.data, new_grid[0]))
                self.pos_embed_col = nn.Parameter(resample_axis_embed(self.pos_embed_col.data, new_grid[1]))
            elif kind == "sincos-2d":
                buf = sincos_2d(new_grid, self.config.width).to(self.pos_embed_fixed.device)
                self.register_buffer("pos_embed_fixed", buf, persistent=False)
        self.config = new_cfg

    def _check_input(self, x: torch.Tensor, any_size: bool = False) -> tuple[int, int]:
        """Validate an image batch and return its token grid."""
        cfg = self.config
        if x.ndim == 4 and x.shape[1] == cfg.in_channels and tuple(x.shape[-2:]) == cfg.image_hw:
            return cfg.grid_size
        if any_size and x.ndim == 4 and x.shape[1] == cfg.in_channels:
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            ph, pw = cfg.effective_patch_hw
            if hw[0] % ph == 0 and hw[1] % pw == 0:
                return (hw[0] // ph, hw[1] // pw)
            raise ValueError(f"input of {hw[0]}x{hw[1]} pixels is not a multiple of the {ph}x{pw} patch "
                             "(in input pixels)")
        raise ValueError(
            f"expected input of shape (B, {cfg.in_channels}, {cfg.image_hw[0]}, {cfg.image_hw[1]}), got "
            f"{tuple(x.shape)}; call set_image_size() to change the resolution, or pass interpolate_pos_embed=True"
        )


def _lecun_normal_(w: torch.Tensor) -> None:
    """Truncated-normal LeCun init (flax's default for Dense and Conv kernels)."""
    fan_in = w[0].numel()
    # 0.8796... is the std of a unit normal truncated to [-2, 2]; dividing by it keeps the variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
