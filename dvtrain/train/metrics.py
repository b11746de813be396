"""Run metrics of one rank: throughput, data wait, MFU and peak memory, per logging window.

One component owns this accounting (nanoGPT-style MFU: the explicit FLOPs formula of
:mod:`dvtrain.flops` over the device's peak). The run loop wraps its batch iterator with
:meth:`RunMeter.timed` (time spent waiting for data) and calls :meth:`RunMeter.window` when it logs.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["RunMeter", "flops_per_image", "peak_memory_gib"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def flops_per_image(recipe: Any, model: Any) -> int:
    """Training FLOPs per image of a recipe's SSL meta-architecture (student 3x forward over all
    crops + teacher forward over the global crops, heads included; :func:`dvtrain.flops.train_flops_per_image`)."""
    from dvtrain.flops import HeadShape, ViTShape, train_flops_per_image

    bb = model.student["backbone"]
    ffn = bb.blocks[0].mlp
    hidden = ffn.w3.in_features if hasattr(ffn, "w3") else ffn.fc1.out_features
    shape = ViTShape(bb.embed_dim, len(bb.blocks), hidden, recipe.model.ffn_layer, recipe.model.patch_size,
                     recipe.model.num_register_tokens)
    lo = recipe.loss
    dino = HeadShape(bb.embed_dim, lo.head_hidden_dim, lo.bottleneck_dim, lo.num_prototypes, lo.head_nlayers)
    ibot = (HeadShape(bb.embed_dim, lo.ibot_hidden_dim, lo.ibot_bottleneck_dim, lo.ibot_num_prototypes, lo.head_nlayers)
            if lo.ibot_separate_head else None)
    frac = recipe.masking.sample_probability * sum(recipe.masking.ratio_min_max) / 2
    return train_flops_per_image(shape, dino, ibot, recipe.crops.global_size, recipe.crops.local_size,
                                 recipe.crops.num_local_crops, frac)


class RunMeter:
    """Throughput / data-wait / MFU accounting of one rank.

    Args:
        images_per_step: images this rank trains on per optimizer step (micro batch x accumulation).
        world_size: ranks (for the run-wide images/s).
        flops_per_image: training FLOPs per image (:func:`flops_per_image`).
        peak_flops: this device's peak FLOP/s in the training precision (0 = unknown: MFU is nan).
        device: for the peak memory.
    """

    def __init__(self, images_per_step: int, world_size: int, flops_per_image: int, peak_flops: float,
                 device: torch.device) -> None:
        self.images_per_step = images_per_step
        self.world_size = world_size
        self.flops_per_image = flops_per_image
        self.peak_flops = peak_flops
        self.device = device
        self.data_wait_s = 0.0
        self._t = time.perf_counter()
        self._wait = 0.0
        self._steps = 0
        self.train_s = 0.0  # wall time of completed windows plus the open one, see :meth:`elapsed`
        self._start = time.perf_counter()
        self.steps_total = 0

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield from ``batches``, adding the time spent waiting for each to :attr:`data_wait_s`."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.data_wait_s += time.perf_counter() - t0
            yield batch

    def step(self) -> None:
        """Count one optimizer step (applied or skipped) of this rank."""
        self._steps += 1
        self.steps_total += 1

    def window(self) -> dict[str, float]:
        """Metrics of the steps since the last call, then start a new window.

        Returns:
            ``images_per_s_per_rank``, ``images_per_s`` (x world size), ``data_wait_fraction``,
            ``mfu`` (nan when the peak is unknown), ``peak_memory_gib``; {} for an empty window.
        """
        if not self._steps:
            return {}
        now = time.perf_counter()
        elapsed = max(now - self._t, 1e-9)
        ips = self._steps * self.images_per_step / elapsed
        out = {
            "images_per_s_per_rank": ips,
            "images_per_s": ips * self.world_size,
            "data_wait_fraction": (self.data_wait_s - self._wait) / elapsed,
            "mfu": self.flops_per_image * ips / self.peak_flops if self.peak_flops else math.nan,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        self._t, self._wait, self._steps = now, self.data_wait_s, 0
        return out

    def images_per_s(self) -> float:
        """Run-wide images/s since this meter was created."""
        return self.steps_total * self.images_per_step * self.world_size / max(time.perf_counter() - self._start, 1e-9)
