"""Image geometry: PIL transforms for images decoded in DataLoader workers, and the same geometry
for whole uint8 batches (``BatchTransform``: in-memory splits in the workers, ``data.cache``
canvases on the device after transfer).

RandomResizedCrop, flip, resize and center crop as boxes + two batched matmuls: ``rrc_boxes`` draws
torchvision's crop boxes for a batch at once, ``resized_crop`` resamples them with PIL's
antialiased bilinear filter. Both run on the device of their inputs, drawing from its global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import v2


def pil_transform(size: int, crop_pct: float, small: bool, train: bool, rrc_scale: tuple):
    """PIL image → ``[C, S, S]`` float32 in ``[0, 1]``: RRC + flip (train), resize + center crop."""
    if train:
        geometry = [v2.RandomResizedCrop(size, scale=rrc_scale, antialias=True),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(size if small else math.floor(size / crop_pct), antialias=True),
                    v2.CenterCrop(size)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def rrc_boxes(n: int, h: int, w: int, scale: tuple, ratio: tuple = (3 / 4, 4 / 3),
              device: torch.device | str | None = None) -> Tensor:
    """RandomResizedCrop boxes ``[n, 4]`` (x0, y0, width, height) in pixels of an ``h × w`` image.

    torchvision's algorithm (10 tries, then the whole image clamped to ``ratio``) vectorised, as
    ``RandomResizedCrop.get_params`` costs ~30 µs per box in Python. Drawn on ``device`` from its
    global generator.
    """
    area = torch.empty(n, 10, device=device).uniform_(*scale) * (h * w)
    r = torch.empty(n, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    cw, ch = (area * r).sqrt().round(), (area / r).sqrt().round()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first, found = ok.int().argmax(1, keepdim=True), ok.any(1)
    fw = min(w, round(h * ratio[1])) if w / h > ratio[1] else w
    fh = min(h, round(w / ratio[0])) if w / h < ratio[0] else h
    cw = torch.where(found, cw.gather(1, first)[:, 0], float(fw))
    ch = torch.where(found, ch.gather(1, first)[:, 0], float(fh))
    x0 = (torch.rand(n, device=device) * (w - cw + 1)).floor()
    y0 = (torch.rand(n, device=device) * (h - ch + 1)).floor()
    return torch.stack([x0, y0, cw, ch], 1)


def _resample_matrix(start: Tensor, length: Tensor, size: int, out: int) -> Tensor:
    """PIL's antialiased bilinear (triangle filter) as a matrix ``[B, out, size]``: output pixel
    ``o`` of the crop ``[start, start + length)`` of an axis averages around ``start + (o + 0.5) *
    scale``, with the filter widened by ``scale`` when shrinking."""
    scale = length / out
    centres = start[:, None] + (torch.arange(out, device=start.device) + 0.5) * scale[:, None]
    dist = (torch.arange(size, device=start.device) + 0.5)[None, None, :] - centres[:, :, None]
    weight = (1 - dist.abs() / scale.clamp(min=1)[:, None, None]).clamp(min=0)
    return weight / weight.sum(-1, keepdim=True)


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None) -> Tensor:
    """Crops ``boxes [B, 4]`` (x0, y0, w, h) of ``x [B, C, h, w]`` and resizes each to ``size²``.

    By hand: torchvision resizes one crop at a time and ``roi_align``/``grid_sample`` are slower
    on CPU; crop-and-resize is separable, so a batch is two batched matmuls. ``flip [B]`` mirrors
    samples for free (reversed column weights).
    """
    rows = _resample_matrix(boxes[:, 1], boxes[:, 3], x.shape[-2], size)
    cols = _resample_matrix(boxes[:, 0], boxes[:, 2], x.shape[-1], size)
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    return rows[:, None] @ x @ cols.transpose(1, 2)[:, None]


@dataclass(frozen=True)
class BatchTransform:
    """uint8 ``[B, C, h, w]`` → float32 ``[B, in_chans, S, S]`` in ``[0, 1]``: ``pil_transform``'s
    geometry for a whole batch. Flip-only training (``rrc_scale`` (1, 1)) at the native size, and
    eval at the native size of a ``small`` dataset, do no resampling at all. Runs on ``x``'s
    device."""

    size: int
    crop_pct: float
    small: bool
    train: bool
    rrc_scale: tuple
    in_chans: int

    def __call__(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = x.float().div_(255)
        flip = torch.rand(b, device=x.device) < 0.5 if self.train else None
        whole = self.small or self.train or self.crop_pct == 1  # no center-crop border
        if self.train and self.rrc_scale != (1.0, 1.0):
            boxes = rrc_boxes(b, h, w, self.rrc_scale, device=x.device)
            x = resized_crop(x, boxes, self.size, flip)
        elif (h, w) == (self.size, self.size) and whole:
            x = x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)
        else:  # a centred square: the whole short side, or crop_pct of it
            side = min(h, w) * (1.0 if whole else self.crop_pct)
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
            if abs(side - self.size) < 1e-6 and (w - self.size) % 2 == (h - self.size) % 2 == 0:
                # whole pixels at scale 1: a slice is what the matmuls would compute
                x = x[..., y0:y0 + self.size, x0:x0 + self.size].contiguous()
                x = x if flip is None else torch.where(flip[:, None, None, None], x.flip(-1), x)
            else:
                box = torch.tensor([(w - side) / 2, (h - side) / 2, side, side], device=x.device)
                box = box.expand(b, 4)
                x = resized_crop(x, box, self.size, flip)
        return x if x.shape[1] == self.in_chans else x.expand(-1, self.in_chans, -1, -1).clone()


def canvas_transform(side: int):
    """PIL image → uint8 ``[C, side, side]``: shorter side resized to ``side`` (PIL bilinear, as
    ``pil_transform``'s eval resize), then the centred ``side × side`` square: a ``data.cache``
    canvas."""
    return v2.Compose([v2.Resize(side, antialias=True), v2.CenterCrop(side), v2.PILToTensor()])
