"""``mixed``: one student for mixed distortions. Each sample draws a family and a severity.

The families it may draw are the registered ones with a severity axis that define
``per_sample`` (``distortkd.distortions``), so a new family joins without a change here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from distortkd.distortions import (
    DISTORTIONS,
    FAMILIES,
    Distortion,
    Family,
    as_numbers,
    check_range,
    register_distortion,
    require,
    uniform_severity,
    with_severity,
)
from distortkd.draws import Draw
from distortkd.errors import unknown


def mixable() -> list[str]:
    """What ``mixed`` may draw: ``clean`` and every family that defines ``per_sample``."""
    return ["clean", *(f for f in with_severity()
                       if DISTORTIONS[f].per_sample.__func__ is not Distortion.per_sample.__func__)]


@register_distortion
@dataclass(frozen=True)
class Mixed(Distortion):
    """Each sample draws a family (with ``weights``) and a severity uniformly from its range.

    Ranges are ``[low, high]`` (or one number): mask ratio, noise σ in pixel values, blur σ in
    pixels (kernel 4σ + 1, computed per sample); any other family's in ``ranges`` (``{family:
    [low, high]}``). ``clean`` may be given a weight too.
    """

    families: tuple = ("mask", "gaussian_noise", "gaussian_blur")
    weights: tuple | None = None
    mask_ratio: tuple = (0.5, 0.95)
    noise_sigma: tuple = (0.1, 0.5)
    blur_sigma: tuple = (1.0, 9.0)
    ranges: Mapping | None = None
    family = "mixed"
    record = Family("Mixed", "MX", prefix="mixed")

    def __post_init__(self):
        fams, accepted = self.families, mixable()
        require(isinstance(fams, Sequence) and not isinstance(fams, str) and len(fams) > 0, "mixed",
                 "families", fams, f"a non-empty list of {', '.join(accepted)}")
        for f in fams:
            if f not in accepted:
                raise unknown("mixed family", f, accepted)
        w = [1.0] * len(fams) if self.weights is None else as_numbers(self.weights)
        require(w is not None and len(w) == len(fams) and min(w) >= 0 and sum(w) > 0, "mixed",
                 "weights", self.weights, f"{len(fams)} non-negative numbers (one per family), not all 0")
        object.__setattr__(self, "families", tuple(fams))
        object.__setattr__(self, "weights", tuple(float(x) for x in w))
        for name in ("mask_ratio", "noise_sigma", "blur_sigma"):  # the paper's three: checked always
            object.__setattr__(self, name, check_range(getattr(self, name), "mixed", name, *self._bounds(name)))
        object.__setattr__(self, "ranges", self._other_ranges())

    def _other_ranges(self) -> tuple | None:
        """``ranges`` checked: one ``[low, high]`` for each drawn family without a parameter of its
        own here, nothing else; as sorted pairs (hashable), None when there are none (as before)."""
        given = dict(self.ranges or {})
        needed = [f for f in self.families if f != "clean" and self._field(f) is None]
        for f in sorted(set(given) - set(needed)):
            raise unknown("mixed ranges family (one of families, without its own parameter)", f,
                          needed or ["none"])
        missing = [f for f in needed if f not in given]
        require(not missing, "mixed", "ranges", self.ranges, f"[low, high] for {', '.join(missing)}")
        return tuple((f, check_range(given[f], "mixed", f"ranges.{f}", *FAMILIES[f].bounds))
                     for f in sorted(needed)) or None

    @staticmethod
    def _field(family: str) -> str | None:
        """``mixed``'s own range parameter for ``family`` (``noise_sigma``), if it has one."""
        record = FAMILIES[family]
        name = f"{record.prefix}_{record.param}"
        return name if name in {f.name for f in fields(Mixed)} else None

    @staticmethod
    def _bounds(name: str) -> tuple[float, float]:
        return next(FAMILIES[f].bounds for f in with_severity() if Mixed._field(f) == name)

    def span(self, family: str) -> tuple[float, float]:
        """The ``(low, high)`` severity range ``family`` is drawn from (``clean``: 0)."""
        if family == "clean":
            return (0.0, 0.0)
        name = self._field(family)
        return getattr(self, name) if name else dict(self.ranges)[family]

    def draw_params(self, draw: Draw) -> tuple[Tensor, Tensor]:
        """Per-sample family index into ``families`` ``[B]`` and severity ``[B]``."""
        probs = torch.tensor(self.weights, device=draw.device)
        cdf = (probs / probs.sum()).cumsum(0)
        choice = torch.searchsorted(cdf, draw.uniform(1, stream=3), right=True).squeeze(1)
        choice = choice.clamp_max(len(self.families) - 1)
        bounds = torch.tensor([self.span(f) for f in self.families], device=draw.device)
        lo, hi = bounds[choice, 0], bounds[choice, 1]
        return choice, uniform_severity(draw, lo, hi)

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        choice, severity = self.draw_params(draw)
        out = images
        # Every family is computed on the whole batch and selected per sample: no data-dependent
        # shapes (so no host sync and no recompiles), at a cost far below one model step.
        for i, fam in enumerate(self.families):
            if fam == "clean":
                continue
            result = DISTORTIONS[fam].per_sample(images, severity, draw, self.span(fam))
            out = torch.where((choice == i).view(-1, 1, 1, 1), result, out)
        return out

    @property
    def severity(self) -> float:
        return float("nan")
