"""The OpenCV operations of ImageNet-C's spatter, re-expressed in torch on batched one-channel images.

Written by hand because neither torch nor torchvision has them (and OpenCV is no dependency here):
Canny edges, the 5×5 chamfer distance transform, histogram equalisation, and 8-bit box and
``filter2D`` filters. Images are ``[B, 1, H, W]`` float tensors holding 8-bit values (integers in
``[0, 255]``) where OpenCV works on uint8; each image is processed on its own, all at once.
Each function follows the OpenCV source it names (``imgproc/src/*.cpp``, OpenCV 3-4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
# canny.cpp: TG22 = tan(22.5°) in fixed point with CANNY_SHIFT = 15 bits, rounded
_CANNY_SHIFT, _TG22 = 15, int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
# distransform.cpp, DIST_L2 with a 5×5 mask: weights 1, 1.4, 2.1969 in 16-bit fixed point (cvRound)
_DIST_SHIFT = 16
_CHAMFER = ((1, 0, 1.0), (1, 1, 1.4), (2, 1, 2.1969))


def correlate(images: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Correlates ``[B, 1, H, W]`` with a ``[k, k]`` kernel (odd k), same-size output, in float64."""
    k = kernel.shape[-1] // 2
    x = F.pad(images.double(), (k, k, k, k), mode=mode)
    return F.conv2d(x, kernel.to(x)[None, None])


def box3(images: Tensor) -> Tensor:
    """``cv2.blur(x, (3, 3))``: the 3×3 mean, border BORDER_REFLECT_101 (torch ``reflect``), float64."""
    return correlate(images, torch.full((3, 3), 1.0 / 9.0, dtype=torch.float64), "reflect")


def canny(images: Tensor, low: float, high: float) -> Tensor:
    """``cv2.Canny(x, low, high)`` (aperture 3, L1 gradient): boolean edges ``[B, 1, H, W]``.

    As canny.cpp: Sobel derivatives with replicated borders; magnitude |dx| + |dy|, zero outside
    the image; a pixel above ``low`` is kept if it is a maximum along its gradient direction
    (quantised to 0°, 45°, 90°, 135° by the fixed-point tan 22.5° test, ``>`` on one side and ``>=``
    on the other as OpenCV); edges are the kept pixels above ``high`` and every kept pixel
    8-connected to them (hysteresis, grown by max-pooling until nothing changes).
    """
    dx = correlate(images, _SOBEL_X, "replicate").long()
    dy = correlate(images, _SOBEL_X.T, "replicate").long()
    mag = dx.abs() + dy.abs()
    h, w = mag.shape[-2:]
    pad = F.pad(mag, (1, 1, 1, 1))

    def at(oy: int, ox: int) -> Tensor:
        return pad[..., 1 + oy : 1 + oy + h, 1 + ox : 1 + ox + w]

    ax, ay = dx.abs(), dy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg22x + (ax << (_CANNY_SHIFT + 1)))
    same_sign = (dx < 0) == (dy < 0)  # canny.cpp: s = (xs ^ ys) < 0 ? -1 : 1
    diagonal = torch.where(same_sign, (mag > at(-1, -1)) & (mag > at(1, 1)),
                           (mag > at(-1, 1)) & (mag > at(1, -1)))
    kept = (mag > low) & torch.where(
        horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
        torch.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)), diagonal))
    edges = kept & (mag > high)
    while True:  # each round grows every edge by up to 4 pixels along kept ones
        grown = edges
        for _ in range(4):
            grown = kept & (F.max_pool2d(grown.float(), 3, 1, 1) > 0) | edges
        if torch.equal(grown, edges):
            return edges
        edges = grown


def distance_to(sources: Tensor, cap: float) -> Tensor:
    """``cv2.distanceTransform(~sources, DIST_L2, 5)`` capped at ``cap``: float32 ``[B, 1, H, W]``.

    OpenCV's 5×5 chamfer distance (steps of 1, 1.4 and 2.1969 px in 16-bit fixed point, the border
    never a source) to the nearest ``True`` pixel. OpenCV's two raster passes give the shortest
    chamfer path; here min-plus relaxation over the 16 steps finds it: every step costs at least
    1 px, so ``ceil(cap)`` rounds reach every distance up to ``cap`` exactly (farther ones: ``cap``,
    as THRESH_TRUNC makes them in spatter).
    """
    big = torch.iinfo(torch.int64).max // 4
    d = torch.where(sources, 0, big).long()
    steps = []
    for a, b, weight in _CHAMFER:
        fixed = round(weight * (1 << _DIST_SHIFT))
        offsets = {(sy * a, sx * b) for sy in (-1, 1) for sx in (-1, 1)}
        offsets |= {(sy * b, sx * a) for sy in (-1, 1) for sx in (-1, 1)}
        steps += [(oy, ox, fixed) for oy, ox in offsets]
    h, w = d.shape[-2:]
    for _ in range(int(-(-cap // 1))):
        padded = F.pad(d, (2, 2, 2, 2), value=big)
        for oy, ox, cost in steps:
            d = torch.minimum(d, padded[..., 2 + oy : 2 + oy + h, 2 + ox : 2 + ox + w] + cost)
    dist = d.float() * (1.0 / (1 << _DIST_SHIFT))
    return dist.clamp(max=cap)


def equalize_hist(images: Tensor) -> Tensor:
    """``cv2.equalizeHist`` per image of 8-bit values, as histogram.cpp: the lowest occupied level
    maps to 0, level j to round(255 · (pixels in (lowest, j]) / (pixels above the lowest)); a constant
    image stays as it is."""
    b = images.shape[0]
    levels = images.long().reshape(b, -1)
    hist = torch.zeros(b, 256, dtype=torch.long, device=images.device).scatter_add_(
        1, levels, torch.ones_like(levels))
    total = levels.shape[1]
    lowest = (hist > 0).long().argmax(dim=1, keepdim=True)
    above = total - hist.gather(1, lowest)
    scale = (255.0 / above.clamp(min=1).float()).float()  # OpenCV: float scale = 255.f / (total - hist[i])
    lut = torch.round(hist.cumsum(1).sub(hist.gather(1, lowest)).float() * scale).clamp(0, 255)
    lut = torch.where(torch.arange(256, device=images.device) <= lowest, 0.0, lut)
    lut = torch.where(above == 0, torch.arange(256, device=images.device).float(), lut)
    return lut.gather(1, levels).reshape(images.shape).to(images.dtype)
