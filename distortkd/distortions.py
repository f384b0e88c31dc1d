"""Batched, device-side image distortions, and the registry of distortion families.

Every distortion takes images ``[B, C, H, W]`` float in ``[0, 1]`` (any float dtype, any device, under
autocast too) and returns a tensor of the same shape and dtype. Severities are in pixel-value units
(``[0, 1]`` range) for noise and in pixels for blur.

``Distortion(images, seeds=None)``: without ``seeds`` randomness comes from torch's global generator
(training). With ``seeds`` (``[B]`` int64), the output is a pure function of (image, seed): random
numbers come from a counter-based hash of (seed, element index) (``distortkd.draws``), so the same
validation image gets the same corruption in every epoch, run, process and batch composition.

A mask ratio, noise σ or blur σ may be a range ``[low, high]``: one uniform draw per sample, the
draw ``Mixed`` makes.

**Families.** Each family is one class with a :class:`Family` record (label, severity parameter,
evaluation grid, presets), registered with ``@register_distortion``. The report, run parsing,
``mixed`` (``distortkd.mixed``), the evaluation grid and the held-out suite read the records, so adding a distortion is
one class plus one YAML file in ``conf/distortion``. ``distortkd.corruptions`` (``corruption``)
and ``distortkd.chains`` (``compose``) register theirs the same way; :func:`families` loads them
first so that no reader sees a partial registry.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor

from distortkd.blur import blur_kernel, odd_kernel, separable_blur
from distortkd.draws import Draw
from distortkd.errors import UserError, unknown


@dataclass(frozen=True)
class Family:
    """What every consumer knows of a distortion family, in one place.

    Attributes:
        label: its name in the report ("Gaussian Noise"); ``short``: in table 2's rows ("GN").
        prefix: the first word of its presets' names (``noise`` in ``noise_strong``): gives the
            family of a run whose config predates ``distortion.family``, and names ``mixed``'s
            range parameter ``<prefix>_<param>`` (``noise_sigma``).
        param: the parameter its one-number severity sets (figure 2's x-axis); None: no axis.
        bounds: the interval a per-sample range ``[low, high]`` of ``param`` must lie in.
        grid: the default evaluation severities (the training severity and beyond).
        presets: the paper's named settings ``{name: params}``, each also a ``conf/distortion`` file.
        strong: the preset tables 2 and 3 take.
    """

    label: str
    short: str
    prefix: str = ""
    param: str | None = None
    bounds: tuple[float, float] | None = None
    grid: tuple[float, ...] = ()
    presets: Mapping[str, Mapping] = field(default_factory=dict)
    strong: str | None = None


# The registries, filled by ``register_distortion`` only: family name -> class, -> record; preset
# name -> (family, params). Read them through ``families()`` (or ``build``) to see every family.
DISTORTIONS: dict[str, type[Distortion]] = {}
FAMILIES: dict[str, Family] = {}
PRESETS: dict[str, tuple[str, dict]] = {}
# Modules that register the other built-in families. Named, not imported: they import this module.
BUILTIN_MODULES = ("distortkd.mixed", "distortkd.corruptions", "distortkd.chains")


def register_distortion(cls: type[Distortion]) -> type[Distortion]:
    """Class decorator: registers ``cls`` under ``cls.family`` with its record ``cls.record``.

    Raises:
        ValueError: the family or one of its presets is already registered (a programming error).
    """
    clash = sorted(({cls.family} | set(cls.record.presets)) & {*DISTORTIONS, *PRESETS})
    if clash:
        raise ValueError(f"distortion {cls.__name__}: {', '.join(clash)} already registered")
    DISTORTIONS[cls.family] = cls
    FAMILIES[cls.family] = cls.record
    PRESETS.update({name: (cls.family, dict(params)) for name, params in cls.record.presets.items()})
    return cls


def families() -> dict[str, Family]:
    """Every registered family's record, in registration order (the built-in modules loaded)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return FAMILIES


def with_severity() -> list[str]:
    """The families with a one-number severity axis (figure 2's panels, the evaluation grid)."""
    return [name for name, record in families().items() if record.param]


def _is_real(value) -> bool:
    """A finite real number; bools are refused (YAML's ``true`` is no σ)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, family: str, name: str, value, accepted: str) -> None:
    """Raises the one-line error naming the parameter, its bad value and the accepted ones."""
    if not ok:
        what = "out of range" if isinstance(value, numbers.Real) and not isinstance(value, bool) else "invalid"
        raise UserError(f"{family} {name} {value!r} is {what}; accepted: {accepted}")


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise UserError(
            f"distortions take float images [B, C, H, W]; got {tuple(images.shape)} {images.dtype}"
        )


def uniform_severity(draw: Draw, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """One severity per sample ``[B]``, uniform in ``[lo, hi]`` (numbers, or ``[B]`` per sample)."""
    return lo + (hi - lo) * draw.uniform(1, stream=4).squeeze(1)


def _per_sample(value: float | tuple, draw: Draw) -> float | Tensor:
    """A fixed severity as is; a ``(low, high)`` range as one uniform draw per sample ``[B, 1, 1, 1]``."""
    return uniform_severity(draw, *value).view(-1, 1, 1, 1) if isinstance(value, tuple) else value


def _blur_per_sample(images: Tensor, sigma: Tensor, lo: float, hi: float, kernel_size: int | None = None) -> Tensor:
    """Blur with one σ per sample ``[B]`` (pixels), σ in ``[lo, hi]``: a kernel of 4σ + 1 taps per
    sample inside the width of ``hi``'s, or ``kernel_size`` taps for every sample."""
    sigma = sigma.clamp_min(lo)  # in Mixed, samples drawn for other families carry other severities
    width = int(odd_kernel(hi)) if kernel_size is None else kernel_size
    size = odd_kernel(sigma) if kernel_size is None else kernel_size
    return separable_blur(images, blur_kernel(size, sigma, width))


def _mask(images: Tensor, ratio: float | Tensor, draw: Draw) -> Tensor:
    """Zeroes each pixel (all channels) with probability ``ratio`` (a number or ``[B, 1, 1, 1]``)."""
    keep = draw.uniform(1, *images.shape[2:], stream=1) >= ratio
    return images * keep.to(images.dtype)


def _noise(images: Tensor, sigma: float | Tensor, draw: Draw, clip: bool = True) -> Tensor:
    """Adds N(0, σ²) in pixel-value units (σ a number or ``[B, 1, 1, 1]``), then clamps."""
    noisy = images.float() + sigma * draw.normal(*images.shape[1:], stream=2)
    return (noisy.clamp(0.0, 1.0) if clip else noisy).to(images.dtype)


def as_numbers(value) -> list | None:
    """``value`` as a list if it is a sequence of finite real numbers (not a string), else None."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(map(_is_real, value)):
        return None
    return list(value)


def check_range(value, family: str, name: str, lo: float, hi: float) -> tuple[float, float]:
    pair = [value, value] if _is_real(value) else as_numbers(value)
    ok = pair is not None and len(pair) == 2 and lo <= pair[0] <= pair[1] <= hi
    require(ok, family, f"{name} range", value, f"a number or [low, high], {lo} <= low <= high <= {hi}")
    return float(pair[0]), float(pair[1])


def _ranged(dist: Distortion, label: str) -> bool:
    """Stores a list-valued severity parameter of ``dist`` as a checked ``(low, high)`` range (one
    uniform draw per sample); False if it is one value, left to the caller to check."""
    name, (lo, hi) = dist.record.param, dist.record.bounds
    value = getattr(dist, name)
    if isinstance(value, str) or not isinstance(value, Sequence):
        return False
    object.__setattr__(dist, name, check_range(value, label, name, lo, hi))
    return True


@dataclass(frozen=True)
class Distortion:
    """Base class: a named, parametrised, batched image corruption.

    A family sets ``family`` (its registry name) and ``record`` (its :class:`Family`); one with a
    severity axis that ``mixed`` may draw also defines ``per_sample``.
    """

    family = "identity"

    def __call__(self, images: Tensor, seeds: Tensor | None = None) -> Tensor:
        _check_images(images)
        return self.apply(images, Draw(images, seeds))

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        return images

    @classmethod
    def per_sample(cls, images: Tensor, severity: Tensor, draw: Draw, bounds: tuple[float, float]) -> Tensor:
        """The family at one severity per sample ``[B]`` (within ``bounds``), as ``mixed`` draws it."""
        raise UserError(f"mixed cannot draw {cls.family!r} per sample: the family defines no per_sample")

    @property
    def severity(self) -> float:
        """The family's one-number strength (ratio, σ in pixel values, σ in pixels)."""
        return 0.0

    def describe(self) -> dict:
        return {"family": self.family, **asdict(self)}


@register_distortion
@dataclass(frozen=True)
class Mask(Distortion):
    """Drops each pixel with probability ``ratio``, the same pixels in every channel, set to 0."""

    ratio: float | tuple = 0.75
    family = "mask"
    record = Family("Random Mask", "RM", prefix="mask", param="ratio", bounds=(0.0, 0.999),
                    grid=(0.5, 0.75, 0.9, 0.95, 0.98), strong="mask_strong",
                    presets={"mask_weak": {"ratio": 0.75}, "mask_strong": {"ratio": 0.9}})

    def __post_init__(self):
        if not _ranged(self, "mask"):
            require(_is_real(self.ratio) and 0.0 <= self.ratio < 1.0, "mask", "ratio", self.ratio,
                     "0 <= ratio < 1, or a range [low, high]")

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        return _mask(images, _per_sample(self.ratio, draw), draw)

    @classmethod
    def per_sample(cls, images: Tensor, severity: Tensor, draw: Draw, bounds: tuple[float, float]) -> Tensor:
        return _mask(images, severity.view(-1, 1, 1, 1), draw)

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.ratio, tuple) else self.ratio


@register_distortion
@dataclass(frozen=True)
class GaussianNoise(Distortion):
    """Adds N(0, σ²) in ``[0, 1]`` pixel units, then (by default) clamps to ``[0, 1]``."""

    sigma: float | tuple = 0.3
    clip: bool = True
    family = "gaussian_noise"
    record = Family("Gaussian Noise", "GN", prefix="noise", param="sigma", bounds=(0.0, 10.0),
                    grid=(0.1, 0.3, 0.5, 0.75, 1.0), strong="noise_strong",
                    presets={"noise_weak": {"sigma": 0.3}, "noise_strong": {"sigma": 0.5}})

    def __post_init__(self):
        if not _ranged(self, "noise"):
            require(_is_real(self.sigma) and self.sigma >= 0, "noise", "sigma", self.sigma,
                     "sigma >= 0, finite, or a range [low, high]")
        require(isinstance(self.clip, bool), "noise", "clip", self.clip, "true or false")

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        return _noise(images, _per_sample(self.sigma, draw), draw, self.clip)

    @classmethod
    def per_sample(cls, images: Tensor, severity: Tensor, draw: Draw, bounds: tuple[float, float]) -> Tensor:
        return _noise(images, severity.view(-1, 1, 1, 1), draw)

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.sigma, tuple) else self.sigma


@register_distortion
@dataclass(frozen=True)
class GaussianBlur(Distortion):
    """Separable Gaussian blur with reflect padding, equal to torchvision's ``gaussian_blur``.

    ``kernel_size`` defaults to the paper's pairing 4σ + 1 (rounded to odd); with a range of σ and no
    ``kernel_size``, every sample gets the kernel of its own σ.
    """

    kernel_size: int | None = None
    sigma: float | tuple = 5.0
    family = "gaussian_blur"
    record = Family("Gaussian Blur", "GB", prefix="blur", param="sigma", bounds=(0.1, 100.0),
                    grid=(1, 5, 9, 13, 17), strong="blur_strong",
                    presets={"blur_weak": {"kernel_size": 21, "sigma": 5.0},
                             "blur_strong": {"kernel_size": 37, "sigma": 9.0}})

    def __post_init__(self):
        if not _ranged(self, "blur"):
            require(_is_real(self.sigma) and self.sigma > 0, "blur", "sigma", self.sigma,
                     "sigma > 0, finite, or a range [low, high]")
            if self.kernel_size is None:
                object.__setattr__(self, "kernel_size", odd_kernel(self.sigma))
        k = self.kernel_size
        require(k is None or isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 and k % 2 == 1,
                 "blur", "kernel_size", k, "odd integers >= 1")

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        if isinstance(self.sigma, tuple):
            return _blur_per_sample(images, uniform_severity(draw, *self.sigma), *self.sigma, self.kernel_size)
        sigma = torch.full((1,), float(self.sigma), device=images.device)  # no host-to-device copy
        return separable_blur(images, blur_kernel(self.kernel_size, sigma, self.kernel_size))

    @classmethod
    def per_sample(cls, images: Tensor, severity: Tensor, draw: Draw, bounds: tuple[float, float]) -> Tensor:
        return _blur_per_sample(images, severity, *bounds)

    @property
    def severity(self) -> float:
        return float("nan") if isinstance(self.sigma, tuple) else self.sigma


@register_distortion
@dataclass(frozen=True)
class Identity(Distortion):
    """Returns the images unchanged (the clean setting)."""

    family = "identity"
    record = Family("Clean", "ID", prefix="clean", presets={"clean": {}})


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
    families()
    if name in PRESETS:
        family, defaults = PRESETS[name]
        if FAMILIES[family].param in params:
            defaults = {}  # a new severity keeps nothing else of the preset: blur's σ its own 4σ + 1 kernel
        params = {**defaults, **params}
    elif name in DISTORTIONS:
        family = name
    else:
        raise unknown("distortion", name, names())
    cls = DISTORTIONS[family]
    accepted = [f.name for f in fields(cls) if not f.name.startswith("_")]
    bad = sorted(set(params) - set(accepted))
    if bad:
        raise UserError(
            f"distortion {name!r} has no parameter {', '.join(bad)}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)


def names() -> list[str]:
    """Every name ``build`` accepts: the registered families and their presets."""
    families()
    return [*DISTORTIONS, *PRESETS]


def at_severity(family: str, severity: float) -> Distortion:
    """The distortion of ``family`` at one severity (blur kernels follow σ as 4σ + 1)."""
    if family not in with_severity():
        raise unknown("distortion family with a severity", family, with_severity())
    return build(family, **{FAMILIES[family].param: float(severity)})


def grid(family: str, overrides: Mapping | None = None) -> list[float]:
    """The evaluation severities of ``family``: ``overrides[family]`` if set, else its record's."""
    chosen = (overrides or {}).get(family)
    return [float(s) for s in (FAMILIES[family].grid if chosen is None else chosen)]
