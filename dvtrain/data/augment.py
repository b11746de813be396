"""DINOv2 multi-crop augmentation on uint8 tensors (torchvision transforms v2).

Follows ``dinov2/data/augmentations.py`` (``DataAugmentationDINO``) and ``dinov2/data/transforms.py``:
per crop RandomResizedCrop (bicubic) -> horizontal flip 0.5 -> ColorJitter(0.4, 0.4, 0.2, 0.1) with
p 0.8 -> grayscale p 0.2 -> Gaussian blur (kernel 9, sigma U(0.1, 2.0)) with a per-crop probability
-> solarize(128) p 0.2 on global crop 2 only -> float in [0, 1] -> ImageNet normalisation.

Blur probabilities (global crop 1, global crop 2, local crops):
- ``"reference"`` (default): 0.0 / 0.9 / 0.5, what the released models were trained with (the
  reference's ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``; dinov2#411, dinov3#286).
- ``"paper"``: 1.0 / 0.1 / 0.5, the written intent.

Determinism: every random draw (crop box, flip, jitter factors and order, coin flips, blur sigma)
comes from torch's global RNG. Inside a DataLoader worker PyTorch seeds that RNG with
``base_seed + worker_id`` where ``base_seed`` is drawn from the loader's ``generator`` when its
iterator is created, so a seeded loader yields the same crops every run; in the main process seed
with ``torch.manual_seed``. Python's ``random`` and numpy's global RNG are never used.

Colour ops run on the uint8 crop after resizing (cheap: hue jitter on a 224 or 96 px crop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["MultiCropAugmentation", "CropTrace", "BLUR_PROBABILITIES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Blur probability for (global crop 1, global crop 2, local crops) per mode.
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "reference": (0.0, 0.9, 0.5),
    "paper": (1.0, 0.1, 0.5),
}


_MIN_CROP = 5  # Gaussian blur kernel 9 pads 4 px by reflection, which needs a side > 4


@dataclass(frozen=True)
class CropTrace:
    """Which random operations were applied to one crop (for tests and debugging)."""

    flip: bool
    color_jitter: bool
    grayscale: bool
    blur: bool
    solarize: bool


def _grayscale_u8(x_CHW: torch.Tensor) -> torch.Tensor:
    """RGB uint8 -> 3-channel luma, bit-exact with PIL's ``convert("L")`` (ITU-R 601-2, rounded).

    torchvision's tensor kernel truncates instead (mean bias -0.5 level, white -> 254).
    """
    r, g, b = x_CHW.to(torch.int32).unbind(0)
    luma_HW = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
    return luma_HW.to(torch.uint8).unsqueeze(0).expand(3, -1, -1).contiguous()


def _coin(p: float) -> bool:
    """One Bernoulli(p) draw from torch's global RNG; always consumes one draw (also for p 0 / 1)."""
    return bool(torch.rand(()) < p)


class _CropPipeline:
    """Geometric + photometric pipeline of one crop kind (global 1, global 2 or local)."""

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> None:
        self.resized_crop = v2.RandomResizedCrop(
            size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        self.color_jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        self.gaussian_blur = v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))
        self.blur_p = blur_p
        self.solarize_p = solarize_p

    def __call__(self, image_CHW: torch.Tensor) -> tuple[torch.Tensor, CropTrace]:
        x = self.resized_crop(image_CHW)
        flip = _coin(0.5)
        if flip:
            x = TF.horizontal_flip(x)
        jitter = _coin(0.8)
        if jitter:
            x = self.color_jitter(x)
        gray = _coin(0.2)
        if gray:
            x = _grayscale_u8(x)
        blur = _coin(self.blur_p)
        if blur:
            x = self.gaussian_blur(x)
        solarize = _coin(self.solarize_p)
        if solarize:
            x = TF.solarize(x, threshold=128)
        x = TF.to_dtype(x, torch.float32, scale=True)
        x = TF.normalize(x, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        return x, CropTrace(flip=flip, color_jitter=jitter, grayscale=gray, blur=blur, solarize=solarize)


class MultiCropAugmentation:
    """2 global + n local crops of one image, as DINOv2 trains on.

    Args:
        global_size: global crop side in pixels (224 in the reference).
        local_size: local crop side in pixels (96, or 98 with patch 14).
        num_local_crops: n >= 0 (8 in the reference).
        global_scale: RandomResizedCrop area fraction range of global crops.
        local_scale: area fraction range of local crops.
        blur: ``"reference"`` (0.0 / 0.9 / 0.5, default, the released models) or ``"paper"``
            (1.0 / 0.1 / 0.5) blur probabilities for global 1 / global 2 / locals.

    Raises:
        ValueError: sizes below 5 px, negative crop count, bad scale ranges or unknown blur mode.
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_local_crops: int,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        blur: Literal["reference", "paper"] = "reference",
    ) -> None:
        if min(global_size, local_size) < _MIN_CROP:
            raise ValueError(
                f"crop sizes must be >= {_MIN_CROP} px (blur kernel 9 uses reflect padding of 4), "
                f"got global_size={global_size}, local_size={local_size}"
            )
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        if blur not in BLUR_PROBABILITIES:
            raise ValueError(f"blur must be one of {sorted(BLUR_PROBABILITIES)}, got {blur!r}")
        self.global_size = global_size
        self.local_size = local_size
        self.num_local_crops = num_local_crops
        self.blur = blur
        p_g1, p_g2, p_local = BLUR_PROBABILITIES[blur]
        self.global1 = _CropPipeline(global_size, tuple(global_scale), blur_p=p_g1, solarize_p=0.0)
        self.global2 = _CropPipeline(global_size, tuple(global_scale), blur_p=p_g2, solarize_p=0.2)
        self.local = _CropPipeline(local_size, tuple(local_scale), blur_p=p_local, solarize_p=0.0)

    @staticmethod
    def to_uint8_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
        """Convert a PIL image or a uint8 tensor to a uint8 RGB tensor [3, H, W].

        Raises:
            ValueError: a tensor that is not uint8 [C, H, W] with C in {1, 3}, or another type.
        """
        if isinstance(image, Image.Image):
            return TF.pil_to_tensor(image.convert("RGB"))
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"expected a PIL image or a uint8 tensor [C, H, W], got {type(image).__name__}")
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"expected a uint8 tensor [C, H, W] with C in (1, 3), got dtype {image.dtype} shape {tuple(image.shape)}"
            )
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image

    def forward_with_trace(
        self, image: Image.Image | torch.Tensor
    ) -> tuple[dict[str, list[torch.Tensor]], list[CropTrace]]:
        """Like ``__call__`` but also returns which random ops were applied.

        Returns:
            (output, traces): output as ``__call__``; traces, one :class:`CropTrace` per crop in the
            order global 1, global 2, local 1..n.
        """
        image_CHW = self.to_uint8_tensor(image)
        g1, t1 = self.global1(image_CHW)
        g2, t2 = self.global2(image_CHW)
        locals_, traces = [], [t1, t2]
        for _ in range(self.num_local_crops):
            crop, trace = self.local(image_CHW)
            locals_.append(crop)
            traces.append(trace)
        return {"global_crops": [g1, g2], "local_crops": locals_}, traces

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Augment one image.

        Args:
            image: PIL image (any mode; converted to RGB) or uint8 tensor [C, H, W], C in {1, 3}.

        Returns:
            ``{"global_crops": [2 x float32 [3, G, G]], "local_crops": [n x float32 [3, l, l]]}``,
            ImageNet-normalised.

        Raises:
            ValueError: unsupported input type, dtype or shape.
        """
        return self.forward_with_trace(image)[0]
