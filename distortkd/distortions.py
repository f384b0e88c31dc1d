"""Batched, device-side image distortions: random pixel masking, Gaussian noise, Gaussian blur.

Every distortion takes images ``[B, C, H, W]`` float in ``[0, 1]`` (any float dtype, any device, under
autocast too) and returns a tensor of the same shape and dtype. Severities are in pixel-value units
(``[0, 1]`` range) for noise and in pixels for blur.

``Distortion(images, seeds=None)``: without ``seeds`` randomness comes from torch's global generator
(training). With ``seeds`` (``[B]`` int64), the output is a pure function of (image, seed): random
numbers come from a counter-based hash of (seed, element index) (``distortkd.draws``), so the same
validation image gets the same corruption in every epoch, run, process and batch composition.

A mask ratio, noise σ or blur σ may be a range ``[low, high]``: one uniform draw per sample, the
draw ``Mixed`` makes. Chains of distortions: ``distortkd.chains`` (family ``compose``).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from distortkd.draws import _Draw, _hash32, _unit, sample_seeds, step_seeds  # noqa: F401  (re-exported)
from distortkd.errors import UserError, unknown


def _is_real(value) -> bool:
    """A finite real number; bools are refused (YAML's ``true`` is no σ)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, family: str, name: str, value, accepted: str) -> None:
    """Raises the one-line error naming the parameter, its bad value and the accepted ones."""
    if not ok:
        what = "out of range" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "invalid"
        raise UserError(f"{family} {name} {value!r} is {what}; accepted: {accepted}")


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise UserError(
            f"distortions take float images [B, C, H, W]; got {tuple(images.shape)} {images.dtype}"
        )


def _blur_kernel(kernel_size: Tensor | int, sigma: Tensor, width: int) -> Tensor:
    """Normalised 1-D Gaussian taps ``[B, width]``, each truncated to its own odd ``kernel_size``.

    A kernel of size k zero-padded to ``width`` and applied with reflect padding of
    ``(width - 1) / 2`` gives exactly the result of size k with padding ``(k - 1) / 2``: reflection is
    the same function of position whatever the pad width.
    """
    x = torch.arange(width, device=sigma.device, dtype=torch.float32) - (width - 1) / 2
    half = (torch.as_tensor(kernel_size, device=sigma.device) - 1) / 2
    pdf = torch.exp(-0.5 * (x[None, :] / sigma.float()[:, None]) ** 2)
    pdf = pdf * (x.abs()[None, :] <= torch.as_tensor(half).reshape(-1, 1))
    return pdf / pdf.sum(dim=1, keepdim=True)


def _reflect_band(kernel: Tensor, n: int) -> Tensor:
    """``[B, n, n]`` matrices M such that ``x @ M`` convolves the length-n rows of ``x`` with the
    taps ``kernel [B, K]`` under reflect padding (the edge pixel not repeated, as ``F.pad``)."""
    b, width = kernel.shape
    taps = torch.arange(width, device=kernel.device) - (width - 1) // 2
    src = torch.arange(n, device=kernel.device)[:, None] + taps  # [n, K]: input index of each tap
    src = src.abs()
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    col = torch.arange(n, device=kernel.device)[:, None].expand(n, width)
    flat = (src * n + col).reshape(1, -1).expand(b, -1)  # M[src, col] += tap
    band = torch.zeros(b, n * n, device=kernel.device, dtype=torch.float32)
    band.scatter_add_(1, flat, kernel.float()[:, None, :].expand(b, n, width).reshape(b, -1))
    return band.view(b, n, n)


def _separable_blur(images: Tensor, kernel: Tensor) -> Tensor:
    """Separable blur with reflect padding; ``kernel`` is ``[1, K]`` (shared) or ``[B, K]``.

    Written by hand instead of ``torchvision...gaussian_blur`` because torchvision convolves with the
    full K×K kernel (37² = 1369 taps for the paper's strong blur) where two 1-D passes need 74.
    Each pass is a product with a banded ``[n, n]`` matrix that folds the reflection in
    (``Mhᵀ · X · Mw``): more multiply-adds than a depthwise ``conv2d`` (n instead of K per pixel)
    but run as GEMMs: 7–8× faster on CPU at 224 px (README, Performance), and no pad copy.
    """
    b, c, h, w = images.shape
    width = kernel.shape[-1]
    if (width - 1) // 2 >= min(h, w):
        raise UserError(
            f"blur kernel {width} is too large for {h}x{w} images (reflect padding needs "
            f"kernel_size < 2*min(H, W) - 1 = {2 * min(h, w) - 1})"
        )
    mw = _reflect_band(kernel, w).to(images.dtype)[:, None]  # [1 or B, 1, w, w]
    mh = _reflect_band(kernel, h).to(images.dtype)[:, None]
    return mh.mT @ (images @ mw)


def _odd_kernel(sigma: float | Tensor) -> Tensor | int:
    """The kernel size the paper pairs with σ: 4σ + 1 (21 for σ 5, 37 for σ 9), made odd."""
    if isinstance(sigma, Tensor):
        return 2 * torch.round(2 * sigma).long() + 1
    return 2 * round(2 * sigma) + 1


def _uniform_severity(draw: _Draw, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """One severity per sample ``[B]``, uniform in ``[lo, hi]`` (numbers, or ``[B]`` per sample)."""
    return lo + (hi - lo) * draw.uniform(1, stream=4).squeeze(1)


def _per_sample(value: float | tuple, draw: _Draw) -> float | Tensor:
    """A fixed severity as is; a ``(low, high)`` range as one uniform draw per sample ``[B, 1, 1, 1]``."""
    return _uniform_severity(draw, *value).view(-1, 1, 1, 1) if isinstance(value, tuple) else value


def _blur_per_sample(images: Tensor, sigma: Tensor, lo: float, hi: float, kernel_size: int | None = None) -> Tensor:
    """Blur with one σ per sample ``[B]`` (pixels), σ in ``[lo, hi]``: a kernel of 4σ + 1 taps per
    sample inside the width of ``hi``'s, or ``kernel_size`` taps for every sample."""
    sigma = sigma.clamp_min(lo)  # in Mixed, samples drawn for other families carry other severities
    width = int(_odd_kernel(hi)) if kernel_size is None else kernel_size
    size = _odd_kernel(sigma) if kernel_size is None else kernel_size
    return _separable_blur(images, _blur_kernel(size, sigma, width))


def _mask(images: Tensor, ratio: float | Tensor, draw: _Draw) -> Tensor:
    """Zeroes each pixel (all channels) with probability ``ratio`` (a number or ``[B, 1, 1, 1]``)."""
    keep = draw.uniform(1, *images.shape[2:], stream=1) >= ratio
    return images * keep.to(images.dtype)


def _noise(images: Tensor, sigma: float | Tensor, draw: _Draw, clip: bool = True) -> Tensor:
    """Adds N(0, σ²) in pixel-value units (σ a number or ``[B, 1, 1, 1]``), then clamps."""
    noisy = images.float() + sigma * draw.normal(*images.shape[1:], stream=2)
    return (noisy.clamp(0.0, 1.0) if clip else noisy).to(images.dtype)


def _numbers(value) -> list | None:
    """``value`` as a list if it is a sequence of finite real numbers (not a string), else None."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(map(_is_real, value)):
        return None
    return list(value)


def _range(value, family: str, name: str, lo: float, hi: float) -> tuple[float, float]:
    pair = [value, value] if _is_real(value) else _numbers(value)
    ok = pair is not None and len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi
    _require(ok, family, f"{name} range", value, f"a number or [low, high], {lo} <= low <= high <= {hi}")
    return float(pair[0]), float(pair[1])


# A family's severity parameter and the interval a per-sample range ``[low, high]`` of it must lie in
# (mask ratio; noise σ in pixel values; blur σ in pixels). ``mixed`` draws from the same intervals.
SEVERITY_RANGE = {"mask": ("ratio", 0.0, 0.999), "gaussian_noise": ("sigma", 0.0, 10.0),
                  "gaussian_blur": ("sigma", 0.1, 100.0)}
# The parameter that a family's one-number severity sets (figure 2's x-axis).
SEVERITY_PARAM = {family: record[0] for family, record in SEVERITY_RANGE.items()}


def _ranged(dist: Distortion, label: str) -> bool:
    """Stores a list-valued severity parameter of ``dist`` as a checked ``(low, high)`` range (one
    uniform draw per sample); False if it is one value, left to the caller to check."""
    name, lo, hi = SEVERITY_RANGE[dist.family]
    value = getattr(dist, name)
    if isinstance(value, str) or not isinstance(value, Sequence):
        return False
    object.__setattr__(dist, name, _range(value, label, name, lo, hi))
    return True


@dataclass(frozen=True)
class Distortion:
    """Base class: a named, parametrised, batched image corruption."""

    family = "identity"

    def __call__(self, images: Tensor, seeds: Tensor | None = None) -> Tensor:
        _check_images(images)
        return self.apply(images, _Draw(images, seeds))

    def apply(self, images: Tensor, draw: _Draw) -> Tensor:
        return images

    @property
    def severity(self) -> float:
        """The family's one-number strength (ratio, σ in pixel values, σ in pixels)."""
        return 0.0

    def describe(self) -> dict:
        return {"family": self.family, **asdict(self)}


@dataclass(frozen=True)
class Identity(Distortion):
    family = "identity"


@dataclass(frozen=True)
class Mask(Distortion):
    """Drops each pixel with probability ``ratio``, the same pixels in every channel, set to 0."""

    ratio: float | tuple = 0.75
    family = "mask"

    def __post_init__(self):
        if not _ranged(self, "mask"):
            _require(_is_real(self.ratio) and 0.0 <= self.ratio < 1.0, "mask", "ratio", self.ratio,
                     "0 <= ratio < 1, or a range [low, high]")

    def apply(self, images: Tensor, draw: _Draw) -> Tensor:
        return _mask(images, _per_sample(self.ratio, draw), draw)

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.ratio, tuple) else self.ratio


@dataclass(frozen=True)
class GaussianNoise(Distortion):
    """Adds N(0, σ²) in ``[0, 1]`` pixel units, then (by default) clamps to ``[0, 1]``."""

    sigma: float | tuple = 0.3
    clip: bool = True
    family = "gaussian_noise"

    def __post_init__(self):
        if not _ranged(self, "noise"):
            _require(_is_real(self.sigma) and self.sigma >= 0, "noise", "sigma", self.sigma,
                     "sigma >= 0, finite, or a range [low, high]")
        _require(isinstance(self.clip, bool), "noise", "clip", self.clip, "true or false")

    def apply(self, images: Tensor, draw: _Draw) -> Tensor:
        return _noise(images, _per_sample(self.sigma, draw), draw, self.clip)

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.sigma, tuple) else self.sigma


@dataclass(frozen=True)
class GaussianBlur(Distortion):
    """Separable Gaussian blur with reflect padding, equal to torchvision's ``gaussian_blur``.

    ``kernel_size`` defaults to the paper's pairing 4σ + 1 (rounded to odd); with a range of σ and no
    ``kernel_size``, every sample gets the kernel of its own σ.
    """

    kernel_size: int | None = None
    sigma: float | tuple = 5.0
    family = "gaussian_blur"

    def __post_init__(self):
        if not _ranged(self, "blur"):
            _require(_is_real(self.sigma) and self.sigma > 0, "blur", "sigma", self.sigma,
                     "sigma > 0, finite, or a range [low, high]")
            if self.kernel_size is None:
                object.__setattr__(self, "kernel_size", _odd_kernel(self.sigma))
        k = self.kernel_size
        _require(k is None or isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 and k % 2 == 1,
                 "blur", "kernel_size", k, "odd integers >= 1")

    def apply(self, images: Tensor, draw: _Draw) -> Tensor:
        if isinstance(self.sigma, tuple):
            return _blur_per_sample(images, _uniform_severity(draw, *self.sigma), *self.sigma, self.kernel_size)
        sigma = torch.full((1,), float(self.sigma), device=images.device)  # no host-to-device copy
        return _separable_blur(images, _blur_kernel(self.kernel_size, sigma, self.kernel_size))

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.sigma, tuple) else self.sigma


MIXED_FAMILIES = ("clean", "mask", "gaussian_noise", "gaussian_blur")


@dataclass(frozen=True)
class Mixed(Distortion):
    """Each sample draws a family (with ``weights``) and a severity uniformly from its range.

    Ranges are ``[low, high]`` (or one number): mask ratio, noise σ in pixel values, blur σ in
    pixels (kernel 4σ + 1, computed per sample). ``clean`` may be given a weight too.
    """

    families: tuple = ("mask", "gaussian_noise", "gaussian_blur")
    weights: tuple | None = None
    mask_ratio: tuple = (0.5, 0.95)
    noise_sigma: tuple = (0.1, 0.5)
    blur_sigma: tuple = (1.0, 9.0)
    family = "mixed"

    def __post_init__(self):
        fams = self.families
        _require(isinstance(fams, Sequence) and not isinstance(fams, str) and len(fams) > 0, "mixed",
                 "families", fams, f"a non-empty list of {', '.join(MIXED_FAMILIES)}")
        for f in fams:
            if f not in MIXED_FAMILIES:
                raise unknown("mixed family", f, MIXED_FAMILIES)
        w = [1.0] * len(fams) if self.weights is None else _numbers(self.weights)
        _require(w is not None and len(w) == len(fams) and min(w) >= 0 and sum(w) > 0, "mixed",
                 "weights", self.weights, f"{len(fams)} non-negative numbers (one per family), not all 0")
        object.__setattr__(self, "families", tuple(fams))
        object.__setattr__(self, "weights", tuple(float(x) for x in w))
        for name, family in (("mask_ratio", "mask"), ("noise_sigma", "gaussian_noise"),
                             ("blur_sigma", "gaussian_blur")):
            object.__setattr__(self, name, _range(getattr(self, name), "mixed", name, *SEVERITY_RANGE[family][1:]))

    def draw_params(self, draw: _Draw) -> tuple[Tensor, Tensor]:
        """Per-sample family index into ``families`` ``[B]`` and severity ``[B]``."""
        probs = torch.tensor(self.weights, device=draw.device)
        cdf = (probs / probs.sum()).cumsum(0)
        choice = torch.searchsorted(cdf, draw.uniform(1, stream=3), right=True).squeeze(1)
        choice = choice.clamp_max(len(self.families) - 1)
        lo_hi = {"clean": (0.0, 0.0), "mask": self.mask_ratio,
                 "gaussian_noise": self.noise_sigma, "gaussian_blur": self.blur_sigma}
        bounds = torch.tensor([lo_hi[f] for f in self.families], device=draw.device)
        lo, hi = bounds[choice, 0], bounds[choice, 1]
        return choice, _uniform_severity(draw, lo, hi)

    def apply(self, images: Tensor, draw: _Draw) -> Tensor:
        choice, severity = self.draw_params(draw)
        out, shape = images, (-1, 1, 1, 1)
        # Every family is computed on the whole batch and selected per sample: no data-dependent
        # shapes (so no host sync and no recompiles), at a cost far below one model step.
        for i, fam in enumerate(self.families):
            pick = (choice == i).view(shape)
            if fam == "mask":
                result = _mask(images, severity.view(shape), draw)
            elif fam == "gaussian_noise":
                result = _noise(images, severity.view(shape), draw)
            elif fam == "gaussian_blur":
                result = _blur_per_sample(images, severity, *self.blur_sigma)
            else:
                continue
            out = torch.where(pick, result, out)
        return out

    @property
    def severity(self) -> float:
        return float("nan")


DISTORTIONS: dict[str, type[Distortion]] = {
    "identity": Identity,
    "mask": Mask,
    "gaussian_noise": GaussianNoise,
    "gaussian_blur": GaussianBlur,
    "mixed": Mixed,
}

# The paper's grid (Sec. 4.2): family and parameters of each named setting.
PRESETS: dict[str, tuple[str, dict]] = {
    "clean": ("identity", {}),
    "mask_weak": ("mask", {"ratio": 0.75}),
    "mask_strong": ("mask", {"ratio": 0.9}),
    "noise_weak": ("gaussian_noise", {"sigma": 0.3}),
    "noise_strong": ("gaussian_noise", {"sigma": 0.5}),
    "blur_weak": ("gaussian_blur", {"kernel_size": 21, "sigma": 5.0}),
    "blur_strong": ("gaussian_blur", {"kernel_size": 37, "sigma": 9.0}),
}


# Families registered by modules that import this one, loaded when first built by name.
PLUGINS = {"corruption": "distortkd.corruptions", "compose": "distortkd.chains"}


def build(name_or_preset: str, /, **params) -> Distortion:
    """Builds a distortion from a family name or a preset, with parameters overriding the preset.

    Args:
        name_or_preset: one of ``DISTORTIONS`` (``mask``, ``gaussian_noise``, ...) or ``PRESETS``
            (``mask_strong``, ``blur_weak``, ...).
        **params: the family's parameters (``ratio``; ``sigma``, ``clip``; ``kernel_size``, ``sigma``).

    Raises:
        UserError: unknown name or parameter, or a parameter out of range.
    """
    name = name_or_preset
    if name in PLUGINS and name not in DISTORTIONS:
        importlib.import_module(PLUGINS[name])
    if name in PRESETS:
        family, defaults = PRESETS[name]
        if family == "gaussian_blur" and "sigma" in params and "kernel_size" not in params:
            defaults = {}  # a new σ gets its own 4σ + 1 kernel, not the preset's
        params = {**defaults, **params}
    elif name in DISTORTIONS:
        family = name
    else:
        raise unknown("distortion", name, {*DISTORTIONS, *PRESETS, *PLUGINS})
    cls = DISTORTIONS[family]
    accepted = [f.name for f in fields(cls) if not f.name.startswith("_")]
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise UserError(
            f"distortion {name!r} has no parameter {', '.join(bad)}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)


def at_severity(family: str, severity: float) -> Distortion:
    """The distortion of ``family`` at one severity (blur kernels follow σ as 4σ + 1)."""
    if family not in SEVERITY_PARAM:
        raise unknown("distortion family with a severity", family, SEVERITY_PARAM)
    return build(family, **{SEVERITY_PARAM[family]: float(severity)})
