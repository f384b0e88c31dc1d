"""Per-sample random numbers for batched distortions: torch's global generator in training, a
counter-based hash of (seed, element index) in evaluation.

With ``seeds`` (``[B]`` int64) every draw is a pure function of (seed, stream, element index), so the
same validation image gets the same corruption in every epoch, run, process and batch composition.
Streams (small ints) keep a distortion's different draws apart; ``step_seeds`` keeps the steps of a
chain apart.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distortkd.errors import UserError

_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """Chris Wellons' 'lowbias32' integer hash on int64 tensors holding values in ``[0, 2**32)``.

    Written by hand because torch has no counter-based RNG that takes a per-row seed tensor;
    int64 products wrap, and masking keeps exactly the low 32 bits the hash is defined on.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _unit(x: Tensor) -> Tensor:
    """32-bit hash values ``[0, 2**32)`` to float32 uniforms strictly inside (0, 1).

    The top 23 bits k give ``(k + 0.5) / 2**23``: k + 0.5 fits float32's 24-bit significand, so every
    value is exact, from 2**-24 to 1 - 2**-24, symmetric about 1/2. With 24 bits, ``k + 0.5`` rounds
    to an integer above 2**23 and the top value to 2**24, i.e. exactly 1.0: ndtri(1) = inf, seeded
    Gaussian noise was ±inf (NaN at σ 0) for ~1 % of 224-px images.
    """
    return ((x >> 9).float() + 0.5) * 2.0**-23


class Draw:
    """Per-sample random numbers for a batch: global generator, or hashed from per-sample seeds."""

    def __init__(self, images: Tensor, seeds: Tensor | None):
        self.batch, self.device = images.shape[0], images.device
        self.raw, self.seeds = None, None
        if seeds is not None:
            seeds = torch.as_tensor(seeds, device=self.device).long().reshape(-1)
            if seeds.numel() != self.batch:
                raise UserError(f"seeds has {seeds.numel()} entries for a batch of {self.batch}")
            self.raw = seeds
            self.seeds = _hash32((seeds & _M32) ^ _hash32((seeds >> 32) & _M32))

    def uniform(self, *shape: int, stream: int) -> Tensor:
        """Uniform floats in the open interval (0, 1), shape ``[B, *shape]``, float32."""
        if self.seeds is None:
            # torch.rand can return exactly 0; keep the interval open for ndtri and log.
            return torch.rand(self.batch, *shape, device=self.device).clamp_min_(2.0**-25)
        n = math.prod(shape)
        idx = torch.arange(n, device=self.device, dtype=torch.long)
        key = _hash32((idx + stream * 0x9E3779B9) & _M32)
        x = _hash32(_hash32(key[None, :] ^ self.seeds[:, None]))
        return _unit(x).reshape(self.batch, *shape)

    def split(self, step: int, images: Tensor) -> Draw:
        """The draw of step ``step`` of a chain: seeds ``step_seeds(seeds, step)``, or the global
        generator when unseeded (it never repeats anyway)."""
        return Draw(images, None if self.raw is None else step_seeds(self.raw, step))

    def normal(self, *shape: int, stream: int) -> Tensor:
        """Standard normal floats, shape ``[B, *shape]``, float32."""
        if self.seeds is None:
            return torch.randn(self.batch, *shape, device=self.device)
        return torch.special.ndtri(self.uniform(*shape, stream=stream))


def step_seeds(seeds: Tensor, step: int) -> Tensor:
    """Per-sample seeds of step ``step`` (0, 1, ...) of a chain, from the samples' seeds ``[B]``.

    ``step + 1`` is XORed into the seed's high 32 bits, which ``Draw`` hashes on their own (a
    bijection) before mixing them into the low bits: two steps of one sample never share a stream,
    even two steps of the same family.
    """
    return torch.as_tensor(seeds).long() ^ ((int(step) + 1) << 32)


def sample_seeds(index: Tensor, run_seed: int) -> Tensor:
    """Per-sample seeds from dataset indices and a run seed, so eval corruption is fixed per image."""
    return index.long() * 1_000_003 + int(run_seed)
