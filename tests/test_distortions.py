"""Distortions: statistics, agreement with torchvision, seeded determinism, dtypes, bad input."""

from dataclasses import fields
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.transforms.v2 import functional as TF

from distortkd import CONF, blur
from distortkd import distortions as D
from distortkd.draws import Draw, sample_seeds
from distortkd.errors import UserError
from distortkd.mixed import Mixed, mixable


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 224, 224, generator=g)


@pytest.mark.parametrize("ratio", [0.75, 0.9])
@pytest.mark.parametrize("seeded", [False, True])
def test_mask_fraction_and_channel_shared(images, ratio, seeded):
    seeds = torch.arange(4) if seeded else None
    out = D.build("mask", ratio=ratio)(images + 0.01, seeds)
    dropped = out == 0
    assert torch.equal(dropped[:, 0], dropped[:, 1]) and torch.equal(dropped[:, 0], dropped[:, 2])
    assert abs(dropped[:, 0].float().mean().item() - ratio) < 0.01
    kept = ~dropped
    assert torch.equal(out[kept], (images + 0.01)[kept])  # kept pixels untouched


@pytest.mark.parametrize("sigma", [0.3, 0.5])
@pytest.mark.parametrize("seeded", [False, True])
def test_noise_std_and_clip(sigma, seeded):
    x = torch.full((4, 3, 128, 128), 0.5)
    seeds = torch.arange(4) if seeded else None
    noisy = D.build("gaussian_noise", sigma=sigma, clip=False)(x, seeds)
    assert abs((noisy - x).std().item() - sigma) < 0.01 and abs((noisy - x).mean().item()) < 0.01
    clipped = D.build("gaussian_noise", sigma=sigma)(x, seeds)
    assert clipped.min() >= 0 and clipped.max() <= 1 and clipped.min() == 0


@pytest.mark.parametrize("preset", ["blur_weak", "blur_strong"])
def test_blur_matches_torchvision(images, preset):
    params = D.PRESETS[preset][1]
    ours = D.build(preset)(images)
    ref = TF.gaussian_blur(images, [params["kernel_size"]] * 2, [params["sigma"]] * 2)
    assert (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("size,kernel", [((40, 64), 21), ((16, 24), 31)])  # 31: pad 15, one short of H
def test_per_sample_blur_on_non_square_images_matches_torchvision(size, kernel):
    x = torch.rand(3, 2, *size, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([1.0, 4.0, 9.0])
    out = blur.separable_blur(x, blur.blur_kernel(kernel, sigmas, kernel))
    for i, sigma in enumerate(sigmas.tolist()):
        ref = TF.gaussian_blur(x[i : i + 1], [kernel] * 2, [sigma] * 2)
        assert (out[i : i + 1] - ref).abs().max() < 1e-5, sigma


def test_blur_default_kernel_is_paper_pairing():
    assert D.build("gaussian_blur", sigma=5).kernel_size == 21
    assert D.build("gaussian_blur", sigma=9).kernel_size == 37
    assert D.build("blur_strong", sigma=3).kernel_size == 13  # new σ gets its own kernel


@pytest.mark.parametrize("name", ["mask_strong", "noise_strong", "mixed"])
def test_seeded_is_pure_function_of_image_and_seed(images, name):
    dist = D.build(name)
    seeds = torch.tensor([11, 12, 13, 14])
    a = dist(images, seeds)
    b = dist(images, seeds)
    assert torch.equal(a, b)
    # same image+seed gives the same output whatever the batch around it
    c = dist(images[2:3], seeds[2:3])
    assert torch.equal(a[2:3], c)
    # different seeds give different corruptions; unseeded draws differ between calls
    assert not torch.equal(dist(images, seeds + 100), a)
    assert not torch.equal(dist(images), dist(images))


def test_sample_seeds_depend_on_index_and_run():
    idx = torch.arange(5)
    assert len(set(sample_seeds(idx, 0).tolist())) == 5
    assert not torch.equal(sample_seeds(idx, 0), sample_seeds(idx, 1))


@pytest.mark.parametrize("name", list(D.PRESETS) + ["mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_autocast(images, name, dtype):
    x = images[:2, :, :96, :96]
    out = D.build(name)(x.to(dtype), torch.arange(2))
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out.float()).all() and out.min() >= 0 and out.max() <= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D.build(name)(x)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_mixed_frequencies_and_ranges():
    mixed = D.build("mixed", families=["mask", "gaussian_noise", "gaussian_blur"], weights=[2, 1, 1],
                    mask_ratio=[0.5, 0.95])
    draw = Draw(torch.zeros(20000, 1, 1, 1), torch.arange(20000))
    choice, severity = mixed.draw_params(draw)
    freq = torch.bincount(choice, minlength=3).float() / len(choice)
    assert torch.allclose(freq, torch.tensor([0.5, 0.25, 0.25]), atol=0.015)
    m = severity[choice == 0]
    assert m.min() >= 0.5 and m.max() <= 0.95 and abs(m.mean().item() - 0.725) < 0.01


def test_mixed_blur_sample_equals_single_blur(images):
    """A per-sample blur inside `mixed` equals the stand-alone blur at the same σ."""
    mixed = D.build("mixed", families=["gaussian_blur"], blur_sigma=[3.0, 3.0])
    ref = D.build("gaussian_blur", sigma=3.0)(images)
    assert (mixed(images) - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name,params,needle",
    [
        ("masking", {}, "accepted: blur_strong"),
        ("mask", {"ratio": 1.0}, "0 <= ratio < 1"),
        ("mask", {"ratio": -0.1}, "-0.1"),
        ("gaussian_noise", {"sigma": -1}, "sigma >= 0"),
        ("gaussian_blur", {"kernel_size": 20, "sigma": 5}, "odd"),
        ("noise_strong", {"ratio": 0.5}, "accepted: sigma, clip"),
        ("mixed", {"families": ["fog"]}, "accepted: clean"),
    ],
)
def test_bad_input_names_value_and_accepted(name, params, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        D.build(name, **params)


def test_blur_too_large_for_image():
    with pytest.raises(UserError, match="too large"):
        D.build("blur_strong")(torch.rand(1, 1, 16, 16))


RANGES = [("mask", "ratio", (0.2, 0.8)), ("gaussian_noise", "sigma", (0.1, 0.7)), ("gaussian_blur", "sigma", (0.5, 2.5))]


def _per_sample_severity(family: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The severity each sample of ``out`` shows: dropped fraction, noise std, or (blur) the σ whose
    stand-alone blur reproduces the sample best on a grid of σ."""
    if family == "mask":
        return (out == 0).float().mean(dim=(1, 2, 3))
    if family == "gaussian_noise":
        return (out - x).std(dim=(1, 2, 3))
    grid = torch.arange(0.5, 2.51, 0.02)
    err = torch.stack([(D.build("gaussian_blur", sigma=float(s))(x) - out).abs().amax(dim=(1, 2, 3)) for s in grid])
    return grid[err.argmin(dim=0)]


@pytest.mark.parametrize(("family", "param", "bounds"), RANGES)
@pytest.mark.parametrize("seeded", [False, True])
def test_range_draws_one_severity_per_sample_uniformly(family, param, bounds, seeded):
    n = 400
    if family == "gaussian_blur":  # a smooth random image: each σ blurs it differently
        x = TF.gaussian_blur(torch.rand(n, 1, 24, 24, generator=torch.Generator().manual_seed(1)), 3, 0.7)
    else:
        x = torch.full((n, 1, 48, 48), 0.5)
    seeds = torch.arange(n) * 1_000_003 if seeded else None
    dist = D.build(family, **{param: list(bounds)}, **({"clip": False} if family == "gaussian_noise" else {}))
    out = dist(x, seeds)
    sev = _per_sample_severity(family, x, out)
    lo, hi = bounds
    slack = 0.05 * (hi - lo)  # estimation error of one sample's severity
    assert sev.min() >= lo - slack and sev.max() <= hi + slack
    assert abs(sev.mean().item() - (lo + hi) / 2) < 0.05 * (hi - lo)
    assert abs(sev.std().item() - (hi - lo) / 12**0.5) < 0.1 * (hi - lo)  # uniform, not one value
    if seeded:
        assert torch.equal(dist(x[:3], seeds[:3]), out[:3])  # a pure function of (image, seed)


@pytest.mark.parametrize("kernel_size", [None, 9])
def test_ranged_blur_sample_equals_stand_alone_blur_at_its_sigma(images, kernel_size):
    seeds = torch.arange(4) + 11
    dist = D.build("gaussian_blur", sigma=[0.5, 3.0], kernel_size=kernel_size)
    sigma = D.uniform_severity(Draw(images, seeds), 0.5, 3.0)  # the draw `mixed` makes too
    out = dist(images, seeds)
    for i, s in enumerate(sigma.tolist()):
        k = kernel_size or 2 * round(2 * s) + 1
        assert (out[i] - TF.gaussian_blur(images[i : i + 1], [k, k], [s, s])[0]).abs().max() < 1e-5


@pytest.mark.parametrize(("family", "param", "value"), [("mask", "ratio", 0.9), ("gaussian_noise", "sigma", 0.3)])
@pytest.mark.parametrize("seeded", [False, True])
def test_fixed_number_keeps_the_fixed_draw(images, family, param, value, seeded):
    """A number is not a range: same streams and formula as before ranges existed, bit for bit."""
    seeds = torch.arange(4) if seeded else None
    torch.manual_seed(3)
    out = D.build(family, **{param: value})(images, seeds)
    torch.manual_seed(3)
    draw = Draw(images, seeds)
    if family == "mask":
        expected = images * (draw.uniform(1, *images.shape[2:], stream=1) >= value).to(images.dtype)
    else:
        expected = (images + value * draw.normal(*images.shape[1:], stream=2)).clamp(0, 1)
    assert torch.equal(out, expected)
    assert D.build(family, **{param: value}).severity == value


@pytest.mark.parametrize(
    ("family", "params", "value"),
    [
        ("mask", {"ratio": [0.8, 0.2]}, [0.8, 0.2]),  # low > high
        ("mask", {"ratio": [0.5, 1.0]}, [0.5, 1.0]),  # outside [0, 0.999]
        ("gaussian_noise", {"sigma": [-0.1, 0.2]}, [-0.1, 0.2]),
        ("gaussian_noise", {"sigma": [0.3]}, [0.3]),  # wrong length
        ("gaussian_blur", {"sigma": [1.0, 2.0, 3.0]}, [1.0, 2.0, 3.0]),
        ("gaussian_blur", {"sigma": [0.05, 2.0]}, [0.05, 2.0]),  # outside [0.1, 100]
        ("gaussian_blur", {"sigma": ["1", "2"]}, ["1", "2"]),
    ],
)
def test_bad_range_is_one_line_naming_value_and_interval(family, params, value):
    with pytest.raises(UserError) as err:
        D.build(family, **params)
    name, (lo, hi) = D.FAMILIES[family].param, D.FAMILIES[family].bounds
    message = str(err.value)
    assert f"{name} range {value!r}" in message and f"accepted: a number or [low, high], {lo} <= low <= high <= {hi}" in message
    assert "\n" not in message


# Registry-wide tests (timm's style): every registered family and preset, a new one included.
@pytest.mark.parametrize("family", list(D.families()))
def test_every_family_record_is_complete(family):
    record, cls = D.FAMILIES[family], D.DISTORTIONS[family]
    assert cls.family == family and record.label and record.short
    if record.param:
        lo, hi = record.bounds
        assert record.param in {f.name for f in fields(cls)} and record.prefix
        assert len(record.grid) >= 2 and all(lo <= s <= hi for s in record.grid)
    assert record.strong is None or record.strong in record.presets
    for preset in record.presets:
        assert isinstance(D.build(preset), cls)


@pytest.mark.parametrize("family", D.with_severity())
def test_every_family_grows_with_severity_over_its_evaluation_grid(family):
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    seeds = torch.tensor([4, 9])
    change = []
    for s in D.grid(family):
        dist = D.at_severity(family, s)
        out = dist(x, seeds)
        assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, dist(x, seeds)) and dist.severity == s
        change.append((out - x).abs().mean().item())
    assert change[0] > 0 and all(a < b for a, b in pairwise(change)), change


@pytest.mark.parametrize("family", mixable()[1:])  # after clean
def test_mixed_draws_every_family_as_that_family_at_its_severity(family):
    """``mixed`` restricted to one family and one severity is that family at that severity."""
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    seeds = torch.arange(3) + 5
    record = D.FAMILIES[family]
    s = record.grid[1]
    own = f"{record.prefix}_{record.param}"
    params = {own: [s, s]} if own in {f.name for f in fields(Mixed)} else {"ranges": {family: [s, s]}}
    mixed = D.build("mixed", families=[family], **params)
    assert (mixed(x, seeds) - D.at_severity(family, s)(x, seeds)).abs().max() < 1e-6


@pytest.mark.parametrize("preset", [p for p, (f, _) in D.PRESETS.items()
                                    if D.DISTORTIONS[f].__module__.startswith("distortkd.")])
def test_every_shipped_preset_is_its_config_file(preset):
    """A preset of a family shipped with the package has its ``conf/distortion`` file, equal."""
    cfg = OmegaConf.load(Path(CONF) / "distortion" / f"{preset}.yaml")
    family, params = D.PRESETS[preset]
    assert (cfg.name, cfg.family, OmegaConf.to_container(cfg.params)) == (preset, family, params)
