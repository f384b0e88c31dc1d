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
_CHUNK = 1 << 16  # numbers hashed per block in Draw.uniform (256 KiB of int32)


def _bits32(x: Tensor) -> Tensor:
    """int64 values in ``[0, 2**32)`` to int32 tensors holding the same 32 bits (two's complement)."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _hash32_(x: Tensor, tmp: Tensor | None = None) -> Tensor:
    """Chris Wellons' 'lowbias32' integer hash, in place on an int32 tensor read as uint32 bits.

    Written by hand because torch has no counter-based RNG that takes a per-row seed tensor. int32,
    in place (``tmp``: a scratch tensor of x's shape) rather than int64 with a mask after each
    product: half the memory and no new tensors. int32 products wrap modulo 2**32, which is the
    uint32 product's bits; right shifts of int32 copy the sign bit, so each is masked to the bits a
    logical shift keeps.
    """
    tmp = torch.empty_like(x) if tmp is None else tmp
    for shift, const in ((16, 0x7FEB352D), (15, 0x846CA68B - 2**32)):  # the uint32 constants' bits
        torch.bitwise_right_shift(x, shift, out=tmp)
        x ^= tmp.bitwise_and_((1 << (32 - shift)) - 1)
        x *= const
    torch.bitwise_right_shift(x, 16, out=tmp)
    x ^= tmp.bitwise_and_(0xFFFF)
    return x


def _hash32(x: Tensor) -> Tensor:
    """``_hash32_`` on int64 tensors holding values in ``[0, 2**32)``; int64 results, same range."""
    return _hash32_(_bits32(x)).long() & _M32


def _unit(x: Tensor) -> Tensor:
    """32-bit hash values to float32 uniforms strictly inside (0, 1); int64 values in ``[0, 2**32)``
    or int32 bits (``_hash32_``'s output) alike.

    The top 23 bits k give ``(k + 0.5) / 2**23``: k + 0.5 fits float32's 24-bit significand, so every
    value is exact, from 2**-24 to 1 - 2**-24, symmetric about 1/2. With 24 bits, ``k + 0.5`` rounds
    to an integer above 2**23 and the top value to 2**24, i.e. exactly 1.0: ndtri(1) = inf, seeded
    Gaussian noise was ±inf (NaN at σ 0) for ~1 % of 224-px images. The mask drops the copies of
    the sign bit an int32 shift brings in.
    """
    return (((x >> 9) & 0x7FFFFF).float() + 0.5) * 2.0**-23


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
        key = _hash32_(_bits32((idx + stream * 0x9E3779B9) & _M32))
        seeds, out = _bits32(self.seeds), torch.empty(self.batch, n, device=self.device)
        # Rows of ~64k numbers at a time, hashed in place in two reused buffers: the block stays in
        # the CPU's cache instead of ten passes over B·n·8 bytes (10x faster for fog's 256² maps).
        rows = max(1, _CHUNK // n)
        buf = torch.empty(min(rows, self.batch), n, dtype=torch.int32, device=self.device)
        tmp = torch.empty_like(buf)
        for r in range(0, self.batch, rows):
            x, t = buf[: min(rows, self.batch - r)], tmp[: min(rows, self.batch - r)]
            torch.bitwise_xor(key[None, :], seeds[r : r + len(x), None], out=x)
            out[r : r + len(x)] = _unit(_hash32_(_hash32_(x, t), t))
        return out.reshape(self.batch, *shape)

    def rows(self, start: int, stop: int) -> Draw:
        """The draw of samples ``start:stop``: seeded, the very numbers those rows of this draw give
        (each row depends on its own seed only); unseeded, a fresh draw of that many samples."""
        sub = object.__new__(Draw)
        sub.device, sub.raw, sub.seeds = self.device, None, None
        if self.seeds is not None:
            sub.raw, sub.seeds = self.raw[start:stop], self.seeds[start:stop]
        sub.batch = len(range(self.batch)[start:stop])
        return sub

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
