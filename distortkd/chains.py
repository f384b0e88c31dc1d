"""``compose``: an ordered chain of registered distortions, e.g. a camera pipeline blur → shot noise → JPEG.

Each step is ``{family: <registered family or preset>, params: {...}}`` and is built by
``distortions.build``, so a step accepts exactly what that family accepts (ranges included). Steps
run in order on the device on the whole batch. With per-sample ``seeds`` step k draws from
``step_seeds(seeds, k)``: the chain is a pure function of (image, seed), and no step repeats
another's random numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distortkd.distortions import Distortion, Family, build, names, register_distortion
from distortkd.draws import Draw
from distortkd.errors import UserError

STEP_KEYS = ("family", "params")


def build_step(index: int, step: object) -> Distortion:
    """Step ``index`` (0-based, named 1-based to the user) of a chain, from its ``{family, params}``."""
    where = f"compose step {index + 1}"
    if isinstance(step, Distortion):
        return step
    if not isinstance(step, Mapping) or "family" not in step:
        raise UserError(f"{where} {step!r} has no family; accepted: {{family: <name>, params: {{...}}}}")
    extra = sorted(set(step) - set(STEP_KEYS))
    if extra:
        raise UserError(f"{where} has unknown key {', '.join(map(str, extra))}; accepted: {', '.join(STEP_KEYS)}")
    family, params = step["family"], step.get("params") or {}
    if not isinstance(family, str) or family not in names():
        raise UserError(f"unknown distortion {family!r} in {where}; accepted: {', '.join(sorted(names()))}")
    if not isinstance(params, Mapping):
        raise UserError(f"{where} params {params!r} is invalid; accepted: a mapping of {family}'s parameters")
    try:
        return build(family, **params)
    except UserError as err:  # say which step the bad parameter belongs to
        raise UserError(f"{where}: {err}") from None


@register_distortion
@dataclass(frozen=True)
class Compose(Distortion):
    """Applies ``steps`` in order; each a ``{family, params}`` mapping (or a built distortion)."""

    steps: tuple = ()
    family = "compose"
    record = Family("Chain", "CH")

    def __post_init__(self):
        steps = self.steps
        if isinstance(steps, str | Mapping) or not isinstance(steps, Sequence) or len(steps) == 0:
            raise UserError(f"compose steps {steps!r} is invalid; accepted: a non-empty list of "
                            "{family: <name>, params: {...}}")
        object.__setattr__(self, "steps", tuple(build_step(i, s) for i, s in enumerate(steps)))

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        # Intermediates in float32 (or wider): rounding to bf16 between steps would shift e.g. a
        # shot-noise sample by a whole photon and change what the JPEG step quantises.
        x = images.to(torch.promote_types(images.dtype, torch.float32))
        for k, step in enumerate(self.steps):
            x = step.apply(x, draw.split(k, x))
        return x.to(images.dtype)

    @property
    def severity(self) -> float:
        return float("nan")  # a chain has no one-number strength

    def describe(self) -> dict:
        return {"family": self.family, "steps": [step.describe() for step in self.steps]}

