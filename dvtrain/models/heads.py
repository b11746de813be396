"""DINO / iBOT projection head with an explicitly weight-normalised prototype layer.

Follows facebookresearch/dinov2 `dinov2/layers/dino_head.py`. The reference wraps the last layer
in `nn.utils.weight_norm`, a forward-pre-hook that recomputes `weight` from `weight_g`/`weight_v`;
under DeepSpeed ZeRO-3 that hook runs outside the parameter gathering and breaks. Here the
normalisation is written out in `WeightNormLinear.forward`, with the same parameter names
(`last_layer.weight_g` [K, 1], `last_layer.weight_v` [K, d]) and the same maths, so reference head
checkpoints load as they are.

Shape legend: B batch, D input width, F hidden width, d bottleneck width, K prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight `weight_g * weight_v / ||weight_v||` (row-wise L2 norm).

    Equivalent to `nn.utils.weight_norm(nn.Linear(in, out, bias=False))` (dim=0) with explicit
    parameters, so ZeRO-3 gathers them like any other module parameter.

    Args:
        in_features: d. out_features: K.
    Init: weight_v as nn.Linear's default (kaiming-uniform, a=sqrt(5)), weight_g = 1 (trainable).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """weight_v: nn.Linear default init; weight_g: ones (reference `weight_g.data.fill_(1)`)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g.fill_(1.0)

    def weight(self) -> Tensor:
        """The effective [K, d] weight g * v / ||v||_row."""
        v_Kd = self.weight_v
        return v_Kd * (self.weight_g / torch.linalg.vector_norm(v_Kd, dim=1, keepdim=True))

    def forward(self, x_Bd: Tensor) -> Tensor:
        """Args: x_Bd [..., d]. Returns: [..., K] logits (dtype of x / autocast)."""
        return F.linear(x_Bd, self.weight().to(x_Bd.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """Projection head: MLP to a bottleneck, L2 normalisation, weight-normalised prototypes.

    Reference: dinov2/layers/dino_head.py `DINOHead` (use_bn=False, mlp_bias=True). Layout for
    nlayers=3: Linear(D, F) GELU Linear(F, F) GELU Linear(F, d); nlayers=1: Linear(D, d).
    MLP linears: trunc_normal(std .02), bias 0. `last_layer` keeps that name: the param groups
    freeze it during the first epoch.

    Args:
        in_dim: D. out_dim: K prototypes. hidden_dim: F. bottleneck_dim: d. nlayers: >= 1.

    Raises:
        ValueError: nlayers < 1 or non-positive widths.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead nlayers must be >= 1, got {nlayers}")
        if min(in_dim, out_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError(
                f"DINOHead widths must be positive: in_dim={in_dim} out_dim={out_dim} "
                f"hidden_dim={hidden_dim} bottleneck_dim={bottleneck_dim}"
            )
        if nlayers == 1:
            self.mlp = nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init: MLP linears trunc_normal(.02) / bias 0; last layer see WeightNormLinear."""
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer.reset_parameters()

    def forward(self, x_BD: Tensor) -> Tensor:
        """Args: x_BD [B, D] features (cls or patch tokens flattened to rows).

        Returns:
            [B, K] prototype logits in the input's floating type (or the autocast type).
        """
        z_Bd = self.mlp(x_BD)
        eps = 1e-6 if z_Bd.dtype == torch.float16 else 1e-12
        z_Bd = F.normalize(z_Bd, dim=-1, p=2, eps=eps)
        return self.last_layer(z_Bd)
