"""DINOv2 Vision Transformer backbone (CLS + optional registers, LayerScale, MLP or SwiGLU FFN).

Follows facebookresearch/dinov2 `dinov2/models/vision_transformer.py` (at the version with
registers) and "Vision Transformers Need Registers" (Darcet et al., 2024). State-dict keys are the
hub keys (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`, `patch_embed.proj.*`,
`blocks.N.*`, `norm.*`) so released checkpoints load strictly (see `dvtrain.models.convert`).

Shape legend: B batch, C channels, H/W image height/width (pixels), h/w patch-grid rows/columns
(H/p, W/p), N patch tokens (h*w), R register tokens, T sequence length (1 + R + N), D width.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from dvtrain.models.archs import ARCH_SPECS
from dvtrain.models.layers import Block, LayerScale, PatchEmbed, SeqGroups, packed_offsets

logger = logging.getLogger(__name__)



def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {v!r}")
    return (int(v[0]), int(v[1]))


def resample_pos_embed(
    patch_pos_1ND: Tensor,
    src_hw: tuple[int, int],
    dst_hw: tuple[int, int],
    offset: float = 0.1,
    antialias: bool = False,
) -> Tensor:
    """Bicubically resample a learned patch position table to another grid.

    Reference: dinov2/models/vision_transformer.py `interpolate_pos_encoding`. Two modes:
    - `offset > 0` (plain DINOv2 models, offset 0.1): `scale_factor=((h + off) / h_src,
      (w + off) / w_src)`. The scale factor (not the output size) drives the sampling
      positions, so this differs slightly from the size form. The output size floor(src * scale)
      is checked before calling; should it ever miss (h, w) (a tiny offset and float error), the
      size form is used and a warning logged.
    - `offset == 0` (register models: with `antialias=True`): explicit `size=(h, w)`.
    Rows are along H: the output token k sits at grid row k // w, column k % w.

    Args:
        patch_pos_1ND: [1, h_src * w_src, D] table (row-major), any float dtype.
        src_hw: (h_src, w_src) grid of the table. dst_hw: (h, w) target grid.
        offset: see above (>= 0). antialias: passed to `F.interpolate` (matters when shrinking).

    Returns:
        [1, h * w, D] float32 table, exactly h * w tokens.
    """
    (hs, ws), (h, w) = src_hw, dst_hw
    D = patch_pos_1ND.shape[-1]
    assert patch_pos_1ND.shape[1] == hs * ws, (patch_pos_1ND.shape, src_hw)
    table_1DHW = patch_pos_1ND.float().reshape(1, hs, ws, D).permute(0, 3, 1, 2)
    kwargs: dict = {"size": (h, w)}
    if offset:
        sh, sw = float(h + offset) / hs, float(w + offset) / ws
        if math.floor(hs * sh) == h and math.floor(ws * sw) == w:
            kwargs = {"scale_factor": (sh, sw)}
        else:
            logger.warning(
                "pos_embed offset %g does not land on grid %s from %s; using the explicit size", offset, dst_hw, src_hw
            )
    out_1DHW = F.interpolate(table_1DHW, mode="bicubic", antialias=antialias, **kwargs)
    assert tuple(out_1DHW.shape[-2:]) == (h, w), (out_1DHW.shape, dst_hw)
    return out_1DHW.permute(0, 2, 3, 1).reshape(1, h * w, D)


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT backbone.

    Reference: dinov2/models/vision_transformer.py `DinoVisionTransformer` (block_chunks=0,
    uniform drop-path rate). Token sequence: [cls, reg_1..reg_R, patch_1..patch_N]; the learned
    position table covers cls + the patches of `img_size` and is resampled to every other grid;
    registers carry no position.

    Args:
        img_size: size (int or (H, W)) the position table is built for; multiple of patch_size.
        patch_size: p. in_chans: C. embed_dim: D. depth: number of blocks. num_heads: heads.
        mlp_ratio: FFN hidden = int(D * mlp_ratio) ("swiglu": then (int(F*2/3)+7)//8*8).
        ffn_layer: "mlp" or "swiglu". qkv_bias, proj_bias, ffn_bias: linear biases.
        drop_path_rate: stochastic depth rate, the same in every block.
        layerscale_init: LayerScale init value (1e-5 for training); None = no LayerScale.
        num_register_tokens: R >= 0.
        interpolate_offset: 0.1 = reference scale-factor form; 0 = explicit size form.
        interpolate_antialias: antialias when resampling the table (register models: True).
        attn_impl: "auto" | "sdpa" | "xformers" | "math" (see `layers.select_attn_impl`).
        activation_checkpointing: recompute each block in backward (training with grad only).
        packed_multicrop: `forward_features_list` runs each block once over all crop batches packed
            into one token sequence (reference `forward_features_list` + `NestedTensorBlock`); False =
            each block once per crop batch (same results up to fp roundoff, drop path aside).

    Raises:
        ValueError: inconsistent sizes, negative counts or unknown options.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        attn_impl: str = "auto",
        activation_checkpointing: bool = False,
        packed_multicrop: bool = True,
    ) -> None:
        super().__init__()
        img_hw = _pair(img_size, "img_size")
        if patch_size <= 0 or img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} must be a positive multiple of patch_size {patch_size}")
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if interpolate_offset < 0:
            raise ValueError(f"interpolate_offset must be >= 0, got {interpolate_offset}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.n_blocks = depth
        self.mlp_ratio = mlp_ratio
        self.ffn_layer = ffn_layer
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self.activation_checkpointing = activation_checkpointing
        self.packed_multicrop = bool(packed_multicrop)
        # grid of the position table, kept as ints (parameter shapes are not reliable under ZeRO-3)
        self.pos_embed_grid = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        num_patches = self.pos_embed_grid[0] * self.pos_embed_grid[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                ffn_layer=ffn_layer,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=drop_path_rate,
                layerscale_init=layerscale_init,
                attn_impl=attn_impl,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as the reference does.

        pos_embed trunc_normal(std .02); cls and register tokens normal(std 1e-6); mask token 0;
        every Linear trunc_normal(std .02) with zero bias (timm `init_weights_vit_timm`); the patch
        Conv2d and LayerNorms keep PyTorch's defaults; LayerScale gammas = init value. Complete, so
        a model built on the `meta` device can be materialised with `to_empty` + `init_weights`.
        """
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv2d, nn.LayerNorm, LayerScale)):
                module.reset_parameters()

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, grid_hw: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """Position table for a (h, w) patch grid, cls entry first.

        Args:
            grid_hw: (h, w) = (H/p, W/p). dtype: output dtype (resampling itself runs in fp32).

        Returns:
            [1, 1 + h*w, D]. The stored table when (h, w) equals its grid, else the resampled one
            (`resample_pos_embed` in this model's mode); never a shortcut on the token count alone.
        """
        if tuple(grid_hw) == self.pos_embed_grid:
            return self.pos_embed.to(dtype)
        pos_1TD = self.pos_embed
        patch_pos_1ND = resample_pos_embed(
            pos_1TD[:, 1:], self.pos_embed_grid, tuple(grid_hw), self.interpolate_offset, self.interpolate_antialias
        )
        return torch.cat((pos_1TD[:, :1].float(), patch_pos_1ND), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x_BCHW: Tensor, masks_BN: Tensor | None = None) -> Tensor:
        """Embed patches, replace masked ones by the mask token, add positions, insert registers.

        Args:
            x_BCHW: [B, C, H, W] images, H and W multiples of p.
            masks_BN: optional [B, N] bool, True = masked (N = h*w, row-major).

        Returns:
            [B, 1 + R + N, D] tokens [cls + pos_0, registers, patch_i + pos_i].

        Raises:
            ValueError: image size not a multiple of p, or a mask of the wrong shape/dtype.
        """
        B, _, H, W = x_BCHW.shape
        x_BND = self.patch_embed(x_BCHW)
        grid_hw = (H // self.patch_size, W // self.patch_size)
        if masks_BN is not None:
            if masks_BN.dtype != torch.bool or tuple(masks_BN.shape) != tuple(x_BND.shape[:2]):
                raise ValueError(
                    f"masks must be a bool tensor of shape [B, N] = {list(x_BND.shape[:2])} for a {H}x{W} input, "
                    f"got {masks_BN.dtype} {list(masks_BN.shape)}"
                )
            x_BND = torch.where(masks_BN.unsqueeze(-1), self.mask_token.to(x_BND.dtype).unsqueeze(0), x_BND)
        x_BTD = torch.cat((self.cls_token.expand(B, -1, -1).to(x_BND.dtype), x_BND), dim=1)
        x_BTD = x_BTD + self.interpolate_pos_encoding(grid_hw, x_BTD.dtype)
        if self.register_tokens is not None:
            reg_BRD = self.register_tokens.expand(B, -1, -1).to(x_BTD.dtype)
            x_BTD = torch.cat((x_BTD[:, :1], reg_BRD, x_BTD[:, 1:]), dim=1)
        return x_BTD

    def _run_block(self, blk: nn.Module, x: Tensor, seq_groups: SeqGroups | None = None) -> Tensor:
        # the module call (not blk.forward): ZeRO-3's hooks gather the block's parameters there
        args = (x,) if seq_groups is None else (x, seq_groups)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def compile_blocks(self, **compile_kwargs) -> None:
        """`torch.compile` each block's `forward` (not the module call), in place.

        The module call and its hooks stay eager, so DeepSpeed ZeRO-3 still gathers a block's
        parameters before the compiled code runs (dinov3 also compiles per block). Compiling twice
        is a no-op.

        Args:
            **compile_kwargs: passed to `torch.compile` (e.g. `dynamic=False`, `mode=...`).
        """
        for blk in self.blocks:
            if not getattr(blk, "_dvtrain_compiled", False):
                blk.forward = torch.compile(blk.forward, **compile_kwargs)
                blk._dvtrain_compiled = True

    def _outputs(self, x_BTD: Tensor, masks_BN: Tensor | None, x_norm_BTD: Tensor | None = None) -> dict:
        R = self.num_register_tokens
        if x_norm_BTD is None:
            x_norm_BTD = self.norm(x_BTD)
        return {
            "x_norm_clstoken": x_norm_BTD[:, 0],
            "x_norm_regtokens": x_norm_BTD[:, 1 : 1 + R],
            "x_norm_patchtokens": x_norm_BTD[:, 1 + R :],
            "x_prenorm": x_BTD,
            "masks": masks_BN,
        }

    # ------------------------------------------------------------------ forwards
    def forward_features_list(self, x_list: list[Tensor], masks_list: list[Tensor | None] | None = None) -> list[dict]:
        """Run several crop batches (e.g. 2B global + nB local crops) through the blocks in one pass.

        Reference: `forward_features_list` with `NestedTensorBlock` and xformers' `BlockDiagonalMask`.
        With `packed_multicrop` (default) the tokens of all crop batches are concatenated into one
        packed [T, D] sequence and each block runs ONCE over it (attention block-diagonal: per
        sequence; norms, FFN, LayerScale over all T tokens at once), then the final norm runs once.
        Without it, each block runs once per crop batch. Both equal separate `forward_features` calls
        up to fp roundoff in eval mode; in training with drop path the packed path drops sequences
        per crop batch as the reference's packed path does (see `layers.Block.forward`).

        Args:
            x_list: list of [B_i, C, H_i, W_i] image batches.
            masks_list: list of [B_i, N_i] bool masks or None, same length; None = no masks.

        Returns:
            list of dicts as `forward_features`, one per input, in order (tensors are views into the
            packed result).

        Raises:
            ValueError: the two lists differ in length (plus `prepare_tokens_with_masks` errors).
        """
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} crop batches but {len(masks_list)} masks (use None for no mask)")
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        if not self.packed_multicrop or len(xs) == 1:
            for blk in self.blocks:
                xs = [self._run_block(blk, x) for x in xs]
            return [self._outputs(x, m) for x, m in zip(xs, masks_list)]
        D = xs[0].shape[-1]
        groups: SeqGroups = tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)
        x_TD = torch.cat([x.reshape(-1, D) for x in xs])
        for blk in self.blocks:
            x_TD = self._run_block(blk, x_TD, groups)
        x_norm_TD = self.norm(x_TD)
        offsets = packed_offsets(groups)
        outs = []
        for (b, n), lo, hi, m in zip(groups, offsets[:-1], offsets[1:], masks_list):
            outs.append(self._outputs(x_TD[lo:hi].view(b, n, D), m, x_norm_TD[lo:hi].view(b, n, D)))
        return outs

    def forward_features(self, x_BCHW: Tensor | list[Tensor], masks: Tensor | list | None = None) -> dict | list[dict]:
        """Backbone features of one image batch (a list is passed to `forward_features_list`).

        Args:
            x_BCHW: [B, C, H, W] images. masks: optional [B, N] bool, True = masked.

        Returns:
            dict with `x_norm_clstoken` [B, D], `x_norm_regtokens` [B, R, D],
            `x_norm_patchtokens` [B, N, D], `x_prenorm` [B, 1 + R + N, D] (before the final
            norm) and `masks` (the input masks or None). Dtype follows the input / autocast.
        """
        if isinstance(x_BCHW, list):
            return self.forward_features_list(x_BCHW, masks)
        x_BTD = self.prepare_tokens_with_masks(x_BCHW, masks)
        for blk in self.blocks:
            x_BTD = self._run_block(blk, x_BTD)
        return self._outputs(x_BTD, masks)

    def get_intermediate_layers(
        self,
        x_BCHW: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens (and optionally cls) of several blocks, as used by the evaluations.

        Reference: `get_intermediate_layers`.

        Args:
            x_BCHW: [B, C, H, W] images.
            n: int = the last n blocks; sequence = these block indices (0-based).
            reshape: patch tokens as [B, D, h, w] instead of [B, N, D].
            return_class_token: also return the cls token [B, D] of each block.
            norm: apply the final LayerNorm to each output.

        Returns:
            tuple over the taken blocks (ascending) of patch tokens [B, N, D] (or [B, D, h, w]), or
            of (patch tokens, cls [B, D]) pairs when `return_class_token`. Registers are dropped.

        Raises:
            ValueError: n out of range.
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be in [1, {depth}] (number of blocks), got {n}")
            take = list(range(depth - n, depth))
        else:
            take = sorted(int(i) for i in n)
            if not take or take[0] < 0 or take[-1] >= depth:
                raise ValueError(f"block indices must be in [0, {depth - 1}], got {list(n)}")
        B, _, H, W = x_BCHW.shape
        x_BTD = self.prepare_tokens_with_masks(x_BCHW)
        outputs = []
        for i, blk in enumerate(self.blocks[: take[-1] + 1]):
            x_BTD = self._run_block(blk, x_BTD)
            if i in take:
                outputs.append(self.norm(x_BTD) if norm else x_BTD)
        cls_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        return tuple(patches)

    def forward(
        self, x_BCHW: Tensor | list[Tensor], masks: Tensor | list | None = None, is_training: bool = False
    ) -> Tensor | dict | list:
        """Backbone call as in the reference (`backbone(x, masks=..., is_training=True)`).

        Under DeepSpeed ZeRO-3 call the module itself (this method), not `forward_features*`:
        the module call is what gathers this module's own parameters (cls/register/mask tokens,
        pos_embed).

        Args:
            x_BCHW: [B, C, H, W] images, or a list of such batches (multi-crop).
            masks: [B, N] bool (or a list matching the image list, None entries allowed).
            is_training: return the full feature dict(s) instead of the cls features.

        Returns:
            is_training: `forward_features` dict (list of dicts for a list input);
            else normalised cls features [B, D] (a list of them for a list input).
        """
        out = self.forward_features(x_BCHW, masks)
        if is_training:
            return out
        return [o["x_norm_clstoken"] for o in out] if isinstance(out, list) else out["x_norm_clstoken"]


def build_backbone(arch: str, **overrides) -> DinoVisionTransformer:
    """Build a backbone by architecture name.

    Args:
        arch: one of `ARCHS` ("vit_small", "vit_base", "vit_large", "vit_giant2") or "vit_tiny".
        **overrides: any `DinoVisionTransformer` argument (patch_size, img_size, ffn_layer, ...);
            `ffn_layer` defaults to the released checkpoint's ("swiglu" for vit_giant2).

    Returns:
        The model, initialised (builds on the current default device, e.g. under
        `torch.device("meta")`).

    Raises:
        ValueError: unknown arch or arguments.
    """
    if arch not in ARCH_SPECS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCH_SPECS)}")
    kwargs = {**ARCH_SPECS[arch], **overrides}
    try:
        return DinoVisionTransformer(**kwargs)
    except TypeError as exc:
        raise ValueError(f"invalid backbone argument for {arch}: {exc}") from exc
