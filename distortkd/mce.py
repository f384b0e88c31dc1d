"""ImageNet-C's mean Corruption Error (mCE) against AlexNet (Hendrycks & Dietterich, ICLR 2019).

CE_c = 100 · Σ_s E_c,s / Σ_s E^AlexNet_c,s over severities 1..5, and mCE is the mean of CE_c over
the 15 benchmark corruptions. The published AlexNet errors are the means over the five severities,
so CE_c = 100 · mean_s E_c,s / ALEXNET_ERR[c] (the factor 5 cancels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distortkd.errors import UserError

# AlexNet top-1 error per corruption, averaged over severities 1..5, as fractions. Source: the
# ImageNet-C authors' values (github.com/hendrycks/robustness), as copied with that citation into
# AugMix's imagenet.py (github.com/google-research/augmix, ALEXNET_ERR) in this order.
ALEXNET_ERR: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
BENCHMARK: tuple[str, ...] = tuple(ALEXNET_ERR)


def mce_vs_alexnet(errors: Mapping[str, Sequence[float]]) -> tuple[float, dict[str, float]]:
    """``(mCE, {corruption: CE})`` in percent from top-1 errors (fractions) at severities 1..5.

    CE is returned for every corruption in ``errors`` that has an AlexNet reference; mCE needs all
    15 benchmark corruptions (the extra ones, e.g. speckle noise, have no published AlexNet error
    here and are not part of the mCE).
    """
    for name, errs in errors.items():
        if len(errs) != 5:
            raise UserError(f"{name} has {len(errs)} errors; accepted: one per severity 1..5")
    missing = [name for name in BENCHMARK if name not in errors]
    if missing:
        raise UserError(f"mCE needs all 15 benchmark corruptions; missing: {', '.join(missing)}")
    ce = {n: 100 * sum(errors[n]) / 5 / ALEXNET_ERR[n] for n in BENCHMARK}
    return sum(ce.values()) / len(ce), ce
