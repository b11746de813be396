"""DINOv2 multi-crop augmentation on uint8 tensors, with fused float kernels for the colour ops.

Follows ``dinov2/data/augmentations.py`` (``DataAugmentationDINO``) and ``dinov2/data/transforms.py``:
per crop RandomResizedCrop (bicubic) -> horizontal flip 0.5 -> ColorJitter(0.4, 0.4, 0.2, 0.1) with
p 0.8 (the four ops in random order) -> grayscale p 0.2 -> Gaussian blur (kernel 9, sigma
U(0.1, 2.0)) with a per-crop probability -> solarize(128) p 0.2 on global crop 2 only -> ImageNet
normalisation.

Blur probabilities (global crop 1, global crop 2, local crops):
- ``"reference"`` (default): 0.0 / 0.9 / 0.5, what the released models were trained with (the
  reference's ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``; dinov2#411, dinov3#286).
- ``"paper"``: 1.0 / 0.1 / 0.5, the written intent.

Speed (benchmarks/data.py, issue 7): random parameters come from torchvision v2's own ``make_params``
(same distributions and the same torch RNG draws as ``v2.RandomResizedCrop`` / ``v2.ColorJitter`` /
``v2.GaussianBlur``); the resized crop is torch's native uint8 bicubic antialiased resize; everything
after it runs in float32 on the 0..255 scale with in-place kernels written here: one dtype conversion
per crop, a hue shift without the HSV round trip (same maths), a separable 1-D Gaussian blur (2 x 9
taps instead of 81) and normalisation fused into one multiply-add.

Numerics versus torchvision's uint8 kernels (tests/test_augment.py): no intermediate uint8 rounding
(torchvision truncates after brightness / contrast / saturation / hue, PIL rounds), so pixels differ
by quantisation only, within a few grey levels; grayscale uses PIL's rounded ITU-R 601-2 luma (bit
exact with ``convert("L")`` on integer input); luma weights are PIL's (0.299, 0.587, 0.114) also in
contrast and saturation (torchvision uses 0.2989 and floors the uint8 luma).

Determinism: every random draw (crop box, flip, jitter factors and order, coin flips, blur sigma)
comes from torch's global RNG. The training loader (``dvtrain.data.loader``) seeds it per sample
from (shuffle seed, epoch, sample id), so the crops depend only on the data position (exact
resume); elsewhere seed with ``torch.manual_seed``. Python's ``random`` and numpy's global RNG are
never used.

Shape legend: C channels (3), H height, W width, K kernel taps (9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from dvtrain.data.images import to_rgb

__all__ = ["MultiCropAugmentation", "CropTrace", "BLUR_PROBABILITIES", "IMAGENET_MEAN", "IMAGENET_STD",
           "normalise", "denormalise", "crop_grid"]

#: ImageNet channel statistics (RGB, on the 0..1 scale) of every dvtrain normalisation: training crops,
#: eval/viz inputs, the Hugging Face image-processor config of exports. The one owner of these numbers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(x_3HW: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation ``(x - mean) / std`` of an RGB image on the 0..1 scale.

    Args:
        x_3HW: float tensor [3, H, W] (or [B, 3, H, W]) with values in [0, 1].

    Returns:
        float tensor of the same shape and dtype.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=x_3HW.dtype, device=x_3HW.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x_3HW.dtype, device=x_3HW.device).view(3, 1, 1)
    return (x_3HW - mean) / std


def denormalise(crop_3HW: torch.Tensor):
    """Undo :func:`normalise` for display: a normalised crop back to 8-bit RGB pixels.

    Args:
        crop_3HW: float (any dtype) tensor [3, H, W], ImageNet-normalised.

    Returns:
        numpy uint8 array [H, W, 3]: ``round(clamp(x * std + mean, 0, 1) * 255)``.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = crop_3HW.detach().float().cpu()
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

#: Blur probability for (global crop 1, global crop 2, local crops) per mode.
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "reference": (0.0, 0.9, 0.5),
    "paper": (1.0, 0.1, 0.5),
}

_MIN_CROP = 5  # Gaussian blur kernel 9 pads 4 px by reflection, which needs a side > 4
_BLUR_KERNEL = 9
_MAX = 255.0  # colour kernels work on float32 in [0, 255]
# PIL's ITU-R 601-2 luma weights as exact 16-bit fixed-point fractions (Convert.c: L24).
_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)
_LUMA_C = torch.tensor(_LUMA)
# hexcone HSV -> RGB offsets n_c of (R, G, B), see _adjust_hue_
_HUE_OFFSETS_C11 = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


@dataclass(frozen=True)
class CropTrace:
    """Which random operations were applied to one crop (for tests and debugging)."""

    flip: bool
    color_jitter: bool
    grayscale: bool
    blur: bool
    solarize: bool


# ---------------------------------------------------------------------------------------------
# float kernels: x_CHW float32 in [0, 255], RGB, modified in place where the name ends with "_"


def _luma(x_CHW: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma [1, H, W] (PIL's weights, not rounded) of RGB float [3, H, W]."""
    r, g, b = x_CHW.unbind(0)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(0)


def _grayscale(x_CHW: torch.Tensor) -> torch.Tensor:
    """3-channel grayscale, PIL ``convert("L")`` rounding: floor(luma + 0.5), as float [3, H, W].

    Bit exact with PIL on integer-valued input (every product and sum is an exact float32 dyadic
    below 2^24 / 2^16). torchvision's uint8 kernel truncates instead (mean bias -0.5, white -> 254).
    """
    return _luma(x_CHW).add_(0.5).floor_().expand(3, -1, -1).contiguous()


def _adjust_brightness_(x_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black, clamp to [0, 255]."""
    return x_CHW.mul_(factor).clamp_(0.0, _MAX)


def _adjust_contrast_(x_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with the mean luma (a scalar), clamp."""
    mean = float(x_CHW.sum(dim=(1, 2)).dot(_LUMA_C)) / x_CHW[0].numel()
    return x_CHW.mul_(factor).add_((1.0 - factor) * mean).clamp_(0.0, _MAX)


def _adjust_saturation_(x_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL ``ImageEnhance.Color``: blend with the per-pixel luma, clamp."""
    gray_1HW = _luma(x_CHW)
    return x_CHW.mul_(factor).add_(gray_1HW, alpha=1.0 - factor).clamp_(0.0, _MAX)


def _adjust_hue_(x_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """Shift the HSV hue by ``factor`` turns (torchvision ``adjust_hue``), without building HSV.

    Value V = max and chroma C = max - min are kept. The hue h in sextants ([-1, 5]) is torchvision's
    ``_rgb_to_hsv`` formula (red max: (g - b) / C; else green max: 2 + (b - r) / C; else
    4 + (r - g) / C), with the max-channel tests done arithmetically (1 - sign(V - c)) because
    ``torch.where`` and comparisons are ~10x slower than arithmetic on CPU. Each channel is then the
    closed-form hexcone of ``_hsv_to_rgb``: c = V - C * clamp(2 - |j|, 0, 1), j = k - 2 wrapped to
    [-3, 3), k = n_c + h + 6 factor, n = (5, 3, 1) for (R, G, B). Same maths; float rounding differs.
    """
    r, g, b = x_CHW.unbind(0)
    vmax_HW = x_CHW.amax(0)
    chroma_HW = vmax_HW - x_CHW.amin(0)
    is_r_HW = torch.sign(vmax_HW - r).neg_().add_(1.0)  # 1 where red is the max, else 0
    is_g_HW = torch.sign(vmax_HW - g).neg_().add_(1.0).mul_(1.0 - is_r_HW)  # green max, red not
    is_b_HW = (1.0 - is_r_HW).sub_(is_g_HW)
    num_HW = (g - b).mul_(is_r_HW)
    num_HW.addcmul_((b - r).add_(chroma_HW, alpha=2.0), is_g_HW)
    num_HW.addcmul_((r - g).add_(chroma_HW, alpha=4.0), is_b_HW)
    h_HW = num_HW.div_(chroma_HW.clamp_min(1e-12))  # C == 0: num is exactly 0, any hue works
    j_CHW = (_HUE_OFFSETS_C11 + (6.0 * factor - 2.0)).add(h_HW)
    j_CHW.add_(torch.add(j_CHW, 3.0).mul_(1.0 / 6.0).floor_(), alpha=-6.0)  # wrap to [-3, 3)
    t_CHW = j_CHW.abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(vmax_HW, chroma_HW, t_CHW, value=-1.0, out=x_CHW)


def _gaussian_kernel1d(sigma: float) -> list[float]:
    """Normalised 9-tap Gaussian weights exp(-i^2 / (2 sigma^2)), i = -4..4 (torchvision's)."""
    half = _BLUR_KERNEL // 2
    w = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-half, half + 1)]
    total = sum(w)
    return [v / total for v in w]


def _gaussian_blur(x_CHW: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel 9, reflect padding (= torchvision ``gaussian_blur`` on float).

    torchvision convolves with the 9 x 9 outer product of the 1-D kernel after 2-D reflect padding;
    a horizontal then a vertical 1-D pass over 1-D reflect-padded planes is the same sum (18 taps
    per pixel instead of 81), equal up to float rounding. The passes are 9 shifted multiply-adds each,
    3x faster than ``conv1d`` / depthwise ``conv2d`` with a 9-tap kernel on one CPU thread.
    """
    _, H, W = x_CHW.shape
    pad = _BLUR_KERNEL // 2
    w_K = _gaussian_kernel1d(sigma)
    rows_CHW = F.pad(x_CHW.unsqueeze(0), (pad, pad, 0, 0), mode="reflect").squeeze(0)
    y_CHW = rows_CHW[..., 0:W] * w_K[0]
    for k in range(1, _BLUR_KERNEL):
        y_CHW.add_(rows_CHW[..., k : k + W], alpha=w_K[k])
    cols_CHW = F.pad(y_CHW.unsqueeze(0), (0, 0, pad, pad), mode="reflect").squeeze(0)
    out_CHW = cols_CHW[:, 0:H] * w_K[0]
    for k in range(1, _BLUR_KERNEL):
        out_CHW.add_(cols_CHW[:, k : k + H], alpha=w_K[k])
    return out_CHW


def _solarize(x_CHW: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.solarize(threshold=128)``: invert the pixels >= 128, as min(x, 255 - x).

    Exact on integer-valued input (no integer lies in (127.5, 128)); a float pixel in (127.5, 128)
    becomes 255 - x instead of x, a change below 1 grey level. Avoids ``torch.where`` (slow on CPU).
    """
    return torch.minimum(x_CHW, _MAX - x_CHW)


_NORM_SCALE_C11 = (1.0 / (_MAX * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_NORM_SHIFT_C11 = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def _normalize(x_CHW: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std as one multiply-add: float32 [3, H, W] ImageNet-normalised."""
    return torch.addcmul(_NORM_SHIFT_C11, x_CHW, _NORM_SCALE_C11)


def _coin(p: float) -> bool:
    """One Bernoulli(p) draw from torch's global RNG; always consumes one draw (also for p 0 / 1)."""
    return bool(torch.rand(()) < p)


class _CropPipeline:
    """Geometric + photometric pipeline of one crop kind (global 1, global 2 or local).

    The v2 transforms are used only for ``make_params`` (parameter sampling, torch RNG).
    """

    _JITTER = (_adjust_brightness_, _adjust_contrast_, _adjust_saturation_, _adjust_hue_)

    def __init__(self, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> None:
        self.size = size
        self.resized_crop = v2.RandomResizedCrop(
            size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
        )
        self.color_jitter = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        self.gaussian_blur = v2.GaussianBlur(kernel_size=_BLUR_KERNEL, sigma=(0.1, 2.0))
        self.blur_p = blur_p
        self.solarize_p = solarize_p

    def _crop(self, image_1CHW: torch.Tensor) -> torch.Tensor:
        """RandomResizedCrop: uint8 [1, 3, h, w] (channels-last) box -> float32 [3, size, size], 0..255."""
        p = self.resized_crop.make_params([image_1CHW])
        box = image_1CHW[..., p["top"] : p["top"] + p["height"], p["left"] : p["left"] + p["width"]]
        if box.shape[-2:] != (self.size, self.size):
            # torch's native uint8 bicubic antialiased resize (rounded, clamped), as torchvision v2
            # uses; 2-3x faster on a channels-last input than on CHW, bit-identical.
            box = F.interpolate(box, size=(self.size, self.size), mode="bicubic", align_corners=False,
                                antialias=True)
        return box.squeeze(0).to(torch.float32, memory_format=torch.contiguous_format)

    def __call__(self, image_1CHW: torch.Tensor) -> tuple[torch.Tensor, CropTrace]:
        """One crop of a uint8 [1, 3, H, W] image -> (float32 [3, size, size] normalised, trace)."""
        x = self._crop(image_1CHW)
        flip = _coin(0.5)
        if flip:
            x = x.flip(-1)
        jitter = _coin(0.8)
        if jitter:
            p = self.color_jitter.make_params([])  # draws fn_idx, 4 factors
            factors = (p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"])
            for fn_id in p["fn_idx"].tolist():
                x = self._JITTER[fn_id](x, factors[fn_id])
        gray = _coin(0.2)
        if gray:
            x = _grayscale(x)
        blur = _coin(self.blur_p)
        if blur:
            x = _gaussian_blur(x, self.gaussian_blur.make_params([])["sigma"][0])
        solarize = _coin(self.solarize_p)
        if solarize:
            x = _solarize(x)
        return _normalize(x), CropTrace(flip=flip, color_jitter=jitter, grayscale=gray, blur=blur,
                                        solarize=solarize)


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
            return TF.pil_to_tensor(to_rgb(image))  # EXIF orientation, 16-bit scaling (data/images.py)
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
        # one channels-last copy per image (a no-op for PIL input) makes every resize 2-3x faster
        image_1CHW = self.to_uint8_tensor(image).unsqueeze(0).contiguous(memory_format=torch.channels_last)
        g1, t1 = self.global1(image_1CHW)
        g2, t2 = self.global2(image_1CHW)
        locals_, traces = [], [t1, t2]
        for _ in range(self.num_local_crops):
            crop, trace = self.local(image_1CHW)
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


def crop_grid(batch: dict, max_images: int = 4):
    """uint8 numpy [H, W, 3] picture of a collated batch: one row per image, its 2 global crops then
    its local crops (upsampled to the global size, nearest)."""
    import numpy as np

    g, loc = batch["collated_global_crops"].float(), batch["collated_local_crops"].float()
    b = g.shape[0] // 2
    n_local = loc.shape[0] // b if b else 0
    size = g.shape[-1]
    rows = []
    for i in range(min(b, max_images)):
        crops = [g[i], g[b + i]]
        crops += [F.interpolate(loc[j * b + i][None], size=(size, size), mode="nearest")[0] for j in range(n_local)]
        rows.append(np.concatenate([denormalise(c) for c in crops], axis=1))
    return np.ascontiguousarray(np.concatenate(rows, axis=0))
