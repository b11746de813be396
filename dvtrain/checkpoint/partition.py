"""ZeRO-3 partitions <-> full tensors: the one place that knows how DeepSpeed splits a parameter.

ZeRO-3 stores each parameter as one flat fp32/fp16/bf16 partition per rank, all of equal length
``ceil(numel / world)``; the last rank's is zero-padded. The full tensor is the rank-ordered
concatenation cut to ``numel``. Used by the live engine (after an all-gather,
``dvtrain.train.engine.ShardedTeacherEngine.gather_fp32_state_dict``) and offline when teacher shards
are read from a checkpoint (``dvtrain.checkpoint.backbone``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["join_partitions"]


def join_partitions(parts: Sequence[torch.Tensor], shape: Sequence[int], what: str = "parameter") -> torch.Tensor:
    """Full tensor of ``shape`` from rank-ordered partitions.

    Args:
        parts: one tensor per rank in rank order (any shape; flattened), or a single full tensor
            (ZeRO stages 0-2).
        shape: the parameter's full shape.
        what: name used in the error message.

    Returns:
        A new contiguous tensor of ``shape`` (dtype of the parts).

    Raises:
        ValueError: the partitions hold fewer elements than ``shape`` needs.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    flat = torch.cat([p.reshape(-1) for p in parts]) if len(parts) > 1 else parts[0].reshape(-1)
    if flat.numel() < numel:
        raise ValueError(f"{what}: partitions hold {flat.numel()} elements, the full tensor needs {numel}")
    return flat[:numel].reshape(tuple(shape)).clone()
