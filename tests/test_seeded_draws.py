"""Seeded draws stay strictly inside (0, 1), so seeded noise is always finite; and every distortion
refuses a bad parameter when it is built, naming the parameter, the value and the accepted range."""

import math

import pytest
import torch

from distortkd import distortions as D
from distortkd import draws
from distortkd.errors import UserError

M32 = 2**32 - 1
TOP = 2**32 - 1  # the hash value of the old edge: (2**24 - 1 + 0.5) rounded to 2**24 in float32


def _hash(x: int) -> int:
    """``draws._hash32`` in Python ints (checked against it below)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _unhash(x: int) -> int:
    """The inverse of ``_hash``: each xorshift and odd multiplication undone in reverse order."""
    x ^= x >> 16
    x = (x * pow(0x846CA68B, -1, 2**32)) & M32
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, 2**32)) & M32
    return x ^ (x >> 16)


def _seed_hitting(value: int, index: int, stream: int) -> int:
    """A per-sample seed whose draw number ``index`` of ``stream`` hashes to ``value``.

    Inverts ``Draw``: ``value = h(h(key ^ h(seed)))`` with ``key = h(index + stream·φ)`` (for seeds
    below 2**32 the high half contributes ``h(0) = 0``).
    """
    key = _hash((index + stream * 0x9E3779B9) & M32)
    return _unhash(_unhash(_unhash(value)) ^ key)


def _edge_seeds(shape: tuple, stream: int) -> torch.Tensor:
    """Seeds ``[4]``: the first and the last value of each sample's draw at the top hash value
    (the old code's 1.0), or at 0."""
    last = math.prod(shape) - 1
    return torch.tensor([_seed_hitting(TOP, 0, stream), _seed_hitting(TOP, last, stream),
                         _seed_hitting(0, 0, stream), _seed_hitting(0, last, stream)])


def test_seed_construction_hits_the_edge_hash_values():
    x = torch.tensor([0, 1, 12345, TOP])
    assert draws._hash32(x).tolist() == [_hash(v) for v in x.tolist()]
    assert all(_unhash(_hash(v)) == v for v in (0, 1, 0xDEADBEEF, TOP))
    seeds = draws._hash32(_edge_seeds((3, 4, 4), stream=2))  # as Draw hashes them
    key = draws._hash32(torch.tensor([0, 47]) + 2 * 0x9E3779B9 & M32)
    hashed = draws._hash32(draws._hash32(key[[0, 1, 0, 1]] ^ seeds))
    assert hashed.tolist() == [TOP, TOP, 0, 0]


def test_unit_draw_is_strictly_inside_0_1_on_the_edge_hash_values():
    edges = torch.tensor([0, 1, 2**9 - 1, 2**9, 2**31, 0xFFFFFF00, TOP - 2**9, TOP])
    u = draws._unit(edges)
    assert u.dtype == torch.float32 and (u > 0).all() and (u < 1).all()
    assert u[0].item() == 2.0**-24 and u[-1].item() == 1 - 2.0**-24
    assert u[0].item() + u[-1].item() == 1.0  # symmetric about 1/2: normals have mean 0 exactly
    assert torch.isfinite(torch.special.ndtri(u)).all()


@pytest.mark.parametrize(
    "build,stream,image",
    [
        (lambda: D.build("gaussian_noise", sigma=0.0), 2, 0.5),  # 0 · inf was NaN
        (lambda: D.build("gaussian_noise", sigma=0.3, clip=False), 2, 0.5),  # was ±inf
        (lambda: D.build("mixed", families=["gaussian_noise"], noise_sigma=0.0), 2, 0.5),
        (lambda: D.build("corruption", name="speckle_noise", severity=5), 105, 0.0),  # 0 · inf
    ],
    ids=["sigma0", "noclip", "mixed_sigma0", "speckle"],
)
def test_seeded_noise_is_finite_where_the_draw_hits_its_edges(build, stream, image):
    shape = (3, 4, 4)
    images = torch.full((4, *shape), image)
    out = build()(images, _edge_seeds(shape, stream))
    assert torch.isfinite(out).all()
    again = build()(images, _edge_seeds(shape, stream))
    assert torch.equal(out, again)


def test_seeded_normals_keep_their_moments_with_the_edge_seeds():
    """The edge samples join ordinary ones: mean 0, variance 1, uniform mean 1/2 and variance 1/12."""
    shape = (64, 64)
    seeds = torch.cat([_edge_seeds(shape, stream=2), torch.arange(252)])
    draw = draws.Draw(torch.zeros(256, 1, *shape), seeds)
    z, u = draw.normal(*shape, stream=2), draw.uniform(*shape, stream=7)
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01
    assert abs(u.mean().item() - 0.5) < 0.002 and abs(u.var().item() - 1 / 12) < 0.001


NAN, INF = float("nan"), float("inf")
# family -> (parameters, how the message names the parameter, the bad value)
BAD = {
    "identity": [({"sigma": 1.0}, "no parameter sigma", None)],
    "mask": [({"ratio": NAN}, "mask ratio", NAN), ({"ratio": 1.5}, "mask ratio", 1.5),
             ({"ratio": [0.9, 0.1]}, "mask ratio range", [0.9, 0.1]),
             ({"ratio": "0.5"}, "mask ratio", "0.5"), ({"ratio": True}, "mask ratio", True)],
    "gaussian_noise": [({"sigma": INF}, "noise sigma", INF), ({"sigma": NAN}, "noise sigma", NAN),
                       ({"sigma": -0.1}, "noise sigma", -0.1), ({"sigma": "0.3"}, "noise sigma", "0.3"),
                       ({"sigma": [0.1, 11.0]}, "noise sigma range", [0.1, 11.0]),
                       ({"clip": "false"}, "noise clip", "false"), ({"clip": 0}, "noise clip", 0)],
    "gaussian_blur": [({"sigma": 0.0}, "blur sigma", 0.0), ({"sigma": INF}, "blur sigma", INF),
                      ({"sigma": [1.0]}, "blur sigma range", [1.0]),
                      ({"kernel_size": 4}, "blur kernel_size", 4),
                      ({"kernel_size": 5.0}, "blur kernel_size", 5.0),
                      ({"kernel_size": True}, "blur kernel_size", True),
                      ({"kernel_size": -1}, "blur kernel_size", -1)],
    "mixed": [({"families": []}, "mixed families", []), ({"families": "mask"}, "mixed families", "mask"),
              ({"weights": [1, NAN, 1]}, "mixed weights", [1, NAN, 1]),
              ({"weights": [1, 2]}, "mixed weights", [1, 2]),
              ({"weights": [0, 0, 0]}, "mixed weights", [0, 0, 0]),
              ({"weights": "abc"}, "mixed weights", "abc"),
              ({"mask_ratio": [0.5]}, "mixed mask_ratio range", [0.5]),
              ({"noise_sigma": [0.1, INF]}, "mixed noise_sigma range", [0.1, INF]),
              ({"blur_sigma": True}, "mixed blur_sigma range", True)],
    "compose": [({"steps": []}, "compose steps", []), ({"steps": "mask"}, "compose steps", "mask"),
                ({"steps": [{"family": "fog"}]}, "unknown distortion 'fog' in compose step 1", "fog"),
                ({"steps": [{"params": {}}]}, "compose step 1", {"params": {}}),
                ({"steps": [{"family": "mask", "params": {"ratio": 1.5}}]}, "compose step 1: mask ratio", 1.5)],
    "corruption": [({"name": ["shot_noise"]}, "unknown corruption", ["shot_noise"]),
                   ({"severity": 6}, "corruption severity", 6),
                   ({"severity": 2.5}, "corruption severity", 2.5),
                   ({"severity": True}, "corruption severity", True)],
}
CASES = [(family, *case) for family in D.families() for case in BAD.get(family, [({}, None, None)])]


@pytest.mark.parametrize(("family", "params", "label", "value"), CASES,
                         ids=[f"{c[0]}-{next(iter(c[1]), '')}={list(c[1].values())}" for c in CASES])
def test_constructor_names_parameter_value_and_accepted_range(family, params, label, value):
    assert family in BAD, f"registered distortion {family!r} has no bad-parameter cases here"
    with pytest.raises(UserError) as err:
        D.build(family, **params)
    message = str(err.value)
    assert label in message and "accepted: " in message and "\n" not in message, message
    if value is not None:
        assert repr(value) in message, message
