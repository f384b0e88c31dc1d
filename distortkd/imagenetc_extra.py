"""ImageNet-C's geometric and weather corruptions on batched tensors (raw ``fn(images, param, draw)``).

``distortkd.corruptions`` wraps these (validation, ``PARAMS`` lookup by function name, dtype, clamp);
this module imports nothing from it, so there is no import cycle. Images are ``[B, C, H, W]`` float
in ``[0, 1]``; all randomness comes from ``Draw`` (one stream id per draw), so a seeded result is a
pure function of (image, seed) whatever the batch. Reference: ``make_imagenet_c.py`` of
github.com/hendrycks/robustness (``ImageNet-C/create_c``). Deviations are listed per function.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distortkd import cvops
from distortkd.blur import blur_kernel
from distortkd.draws import Draw
from distortkd.errors import UserError

FROST_ENV = "DISTORTKD_FROST_DIR"
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")
# The reference draws np.random.randint(5): frost6.jpg is listed but never used; kept as published.
FROST_USED = 5


def _sym_matrix(n: int, sigma: float, truncate: float) -> Tensor:
    """``[n, n]`` matrix M such that ``x @ M`` is scipy's 1-D Gaussian filter along the last axis
    with ``mode='reflect'`` (edge repeated, d c b a | a b c d | d c b a) at any kernel size.

    Hand-written because torch's reflect padding needs pad < n, while elastic's σ (170 px at
    level 1) gives kernels far wider than the image: the index is folded with period 2n instead.
    """
    half = int(truncate * sigma + 0.5)
    taps = blur_kernel(2 * half + 1, torch.tensor([float(sigma)]), 2 * half + 1)[0].double()
    src = torch.arange(n)[:, None] + torch.arange(-half, half + 1)[None, :]  # [n, K]
    src = src % (2 * n)
    src = torch.where(src >= n, 2 * n - 1 - src, src)
    m = torch.zeros(n, n, dtype=torch.float64)
    col = torch.arange(n)[:, None].expand_as(src)
    m.index_put_(
        (src.reshape(-1), col.reshape(-1)), taps.expand_as(src).reshape(-1), accumulate=True
    )
    return m


def _smooth(x: Tensor, sigma: float, truncate: float = 4.0) -> Tensor:
    """Gaussian filter (σ in pixels) of ``[..., H, W]`` over the last two axes, scipy ``reflect``."""
    rows = _sym_matrix(x.shape[-2], sigma, truncate).to(x)
    cols = _sym_matrix(x.shape[-1], sigma, truncate).to(x)
    return rows.T @ x @ cols


def _base_grid(b: int, h: int, w: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(ys, xs)``, each ``[B, H, W]``."""
    ys = torch.arange(h, device=like.device, dtype=like.dtype)[:, None].expand(h, w)
    xs = torch.arange(w, device=like.device, dtype=like.dtype)[None, :].expand(h, w)
    return ys.expand(b, h, w), xs.expand(b, h, w)


def _sample(images: Tensor, ys: Tensor, xs: Tensor, mode: str, padding: str) -> Tensor:
    """``images`` read at pixel coordinates ``ys, xs [B, H, W]`` (``grid_sample``, pixel centres)."""
    h, w = images.shape[-2:]
    grid = torch.stack((2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1), dim=-1)
    return F.grid_sample(
        images, grid.to(images), mode=mode, padding_mode=padding, align_corners=True
    )


def motion_kernel(radius: float, sigma: float) -> Tensor:
    """ImageMagick ``MotionBlurImage`` taps: a one-sided half Gaussian of width ``2·ceil(radius)+1``
    (``GetOptimalKernelWidth1D``), tap i weighing exp(-i²/2σ²), normalised; float64 ``[K]``."""
    i = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    k = torch.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


def motion_blur_at(images: Tensor, radius: float, sigma: float, degrees: Tensor) -> Tensor:
    """Per-sample motion blur at ``degrees [B]``: tap i reads the pixel at the rounded offset
    ``(i·cos θ, i·sin θ)`` (as ImageMagick), edge pixels replicated beyond the border.

    Deviation from ImageMagick: no 16-bit quantum rounding, and its virtual-pixel "edge" method
    is taken as replicate padding. Offsets are whole pixels, so each tap is a slice of the padded
    image: a loop over samples × taps of views, 16× faster on CPU than a nearest ``grid_sample``
    per tap (7 → 113 img/s at 224 px, batch 64, level 3).
    """
    h, w = images.shape[-2:]
    taps = motion_kernel(radius, sigma)
    pad = len(taps) - 1
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    theta = torch.deg2rad(degrees.detach().double().cpu())
    i = torch.arange(len(taps), dtype=torch.float64)
    dx = torch.round(i[None, :] * torch.cos(theta)[:, None]).long().tolist()  # [B][K]
    dy = torch.round(i[None, :] * torch.sin(theta)[:, None]).long().tolist()
    out = torch.zeros_like(images)
    for b in range(images.shape[0]):
        for k, tap in enumerate(taps.tolist()):
            top, left = pad + dy[b][k], pad + dx[b][k]
            out[b] += tap * padded[b, :, top : top + h, left : left + w]
    return out


def _grey(images: Tensor) -> Tensor:
    """cv2 RGB2GRAY luma ``[B, 1, H, W]`` (one-channel images are their own grey)."""
    if images.shape[1] == 1:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def motion_blur(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """ImageMagick motion blur (radius, σ in pixels) at an angle uniform in [-45°, 45°)."""
    degrees = -45 + 90 * draw.uniform(stream=201)
    return motion_blur_at(images, *param, degrees)


def glass_blur(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """Gaussian blur (σ), ``iterations`` rounds of local pixel shuffling by up to ``delta``, blur again.

    Deviation: the reference swaps pixels one by one (raster order, bottom-right first), each pixel
    of ``(delta, H - delta]²`` with a partner at offset ``randint(-delta, delta)`` per axis
    (``delta - 1`` at most, as published). Here every such pixel reads its partner at once
    (a gather from the blurred image): the same offset law per pixel, but a pixel may be copied
    twice or lost instead of exchanged, and no pixel travels along a chain of swaps. The
    local-scramble statistics that make glass blur (per-pixel offsets of at most ``delta``) are
    the same; a serial loop over 50k pixels per image would be ~10⁴× slower in Python.
    Both blurs fold at the border as scipy ``reflect`` (skimage's default here is ``nearest``:
    at σ ≤ 1.5 px this changes only the outermost pixels).
    """
    sigma, delta, iterations = param
    x = _smooth(images, sigma)
    b, _, h, w = x.shape
    ys, xs = _base_grid(b, h, w, x)
    inside = (ys > delta) & (ys <= h - delta) & (xs > delta) & (xs <= w - delta)
    for it in range(iterations):
        u = draw.uniform(2, h, w, stream=210 + it).to(x)
        off = torch.floor(u * 2 * delta) - delta
        y2 = torch.where(inside, ys + off[:, 0], ys).clamp(0, h - 1)
        x2 = torch.where(inside, xs + off[:, 1], xs).clamp(0, w - 1)
        flat = (y2 * w + x2).long().view(b, 1, -1).expand(-1, x.shape[1], -1)
        x = x.flatten(2).gather(2, flat).view_as(x)
    return _smooth(x, sigma)


def _affine_points(h: int, w: int, jitter: Tensor) -> Tensor:
    """cv2 ``getAffineTransform`` from the reference's three points to their jittered copies, as
    ``[B, 2, 3]`` maps destination (x, y, 1) → source (x, y) (``warpAffine``'s inverse map)."""
    cy, cx, s = h // 2, w // 2, min(h, w) // 3
    # the reference builds points as (row, col) pairs but cv2 reads them as (x, y): kept
    pts1 = torch.tensor([[cy + s, cx + s], [cy + s, cx - s], [cy - s, cx - s]], dtype=torch.float64)
    pts2 = pts1 + jitter.double()
    ones = torch.ones(jitter.shape[0], 3, 1, dtype=torch.float64)
    dst = torch.cat((pts2, ones), dim=-1)  # forward: pts1 → pts2; invert: solve dst · A = pts1
    return torch.linalg.solve(dst, pts1.expand_as(pts2)).transpose(1, 2)


def elastic_transform(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """Random affine (points jittered by ±``c[2]`` px), then a smooth random displacement field
    (uniform noise smoothed by σ = ``c[1]`` px, truncate 3, times α = ``c[0]`` px), bilinear.

    Deviations: ``warpAffine``'s BORDER_REFLECT_101 and ``map_coordinates``' ``reflect`` are both
    ``grid_sample``'s reflection about the border pixel centres; both warps are bilinear in float.
    """
    alpha, sigma, jitter = param
    b, _, h, w = images.shape
    u = draw.uniform(3, 2, stream=220).to(torch.float64)
    inv = _affine_points(h, w, (2 * u - 1).cpu() * jitter).to(images)  # [B, 2, 3] as (x, y)
    ys, xs = _base_grid(b, h, w, images)
    pix = torch.stack((xs, ys, torch.ones_like(xs)), dim=-1)  # [B, H, W, 3]
    src = torch.einsum("bhwk,bjk->bhwj", pix, inv)
    x = _sample(images, src[..., 1], src[..., 0], "bilinear", "reflection")
    noise = 2 * draw.uniform(2, h, w, stream=221).to(images) - 1
    field = _smooth(noise, sigma, truncate=3.0) * alpha  # [B, 2, H, W]: dx, dy
    return _sample(x, ys + field[:, 1], xs + field[:, 0], "bilinear", "reflection")


_FOG_BYTES = 8 << 20  # the plasma maps of one chunk (16 at 256²): they stay in the CPU's cache


def plasma_fractal(draw: Draw, mapsize: int, decay: float, stream: int) -> Tensor:
    """The reference's diamond-square height map ``[B, S, S]`` in [0, 1], per sample, batched."""
    m = torch.zeros(draw.batch, mapsize, mapsize, dtype=torch.float64, device=draw.device)
    step, wibble, k = mapsize, 100.0, 0

    def wibbled(a: Tensor) -> Tensor:
        nonlocal k
        k += 1
        u = draw.uniform(*a.shape[1:], stream=stream + k).to(a)
        return a / 4 + wibble * (wibble * (2 * u - 1))  # wibble · U(-wibble, wibble), verbatim

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + corner.roll(-1, 1)
        m[:, half::step, half::step] = wibbled(sq + sq.roll(-1, 2))
        dr, ul = m[:, half::step, half::step], m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step, wibble = half, wibble / decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """Adds ``c[0]`` × a plasma fractal (decay ``c[1]``; top-left crop of a 256² map, larger maps
    for images over 256 px), rescaled by max / (max + c[0]) with the image's maximum."""
    scale, decay = param
    h, w = images.shape[-2:]
    size = max(256, 1 << (max(h, w) - 1).bit_length())
    # A few maps at a time: 1,000 float64 256² maps are 0.5 GB per temporary, and the page faults of
    # allocating them took more time than the arithmetic (1,000 images: 22 s, half of it system
    # time; 16 at a time: 11 s, README demo "Time"). Each map depends on its own seed only, so the maps
    # are the same.
    chunk = max(1, _FOG_BYTES // (size * size * 8))
    plasma = torch.cat([plasma_fractal(draw.rows(r, r + chunk), size, decay, stream=300)[:, None, :h, :w]
                        for r in range(0, draw.batch, chunk)]).to(images)
    top = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images + scale * plasma) * top / (top + scale)


def _zoom_layer(layer: Tensor, factor: float) -> Tensor:
    """The reference's ``clipped_zoom`` (scipy order-1 zoom of the centre crop), ``[B, 1, H, W]``."""
    h, w = layer.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    size = (round(ch * factor), round(cw * factor))
    crop = layer[..., top : top + ch, left : left + cw]
    zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)
    th, tw = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[..., th : th + h, tw : tw + w]


def snow(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """Snow flakes: N(loc, scale) zoomed, thresholded, motion-blurred at [-135°, -45°), added
    twice (also rotated 180°) to the image brightened towards 1.5 · grey + 0.5.

    Deviation: the flake layer stays float (the reference rounds it to uint8 for ImageMagick).
    """
    loc, scale, zoom, threshold, radius, sigma, keep = param
    h, w = images.shape[-2:]
    layer = loc + scale * draw.normal(1, h, w, stream=401).to(images)
    layer = _zoom_layer(layer, zoom)
    layer = torch.where(layer < threshold, 0.0, layer).clamp(0, 1)
    layer = motion_blur_at(layer, radius, sigma, -135 + 90 * draw.uniform(stream=402))
    x = keep * images + (1 - keep) * torch.maximum(images, _grey(images) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)


def frost_dir() -> Path | None:
    """The folder of the benchmark's frost photographs (``$DISTORTKD_FROST_DIR``), or None."""
    value = os.environ.get(FROST_ENV)
    return Path(value) if value else None


def check_frost_dir(folder: Path) -> None:
    """One-line UserError naming any of the six frost files missing from ``folder``."""
    missing = [name for name in FROST_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{FROST_ENV}={folder} lacks {', '.join(missing)}; accepted: a folder with "
            f"{', '.join(FROST_FILES)}"
        )


@functools.lru_cache(maxsize=4)
def _frost_textures(folder: str) -> tuple[Tensor, ...]:
    """The five used frost photographs as RGB float ``[3, h, w]`` in [0, 1] (PIL decodes)."""
    import numpy as np
    from PIL import Image

    check_frost_dir(Path(folder))
    out = []
    for name in FROST_FILES[:FROST_USED]:
        with Image.open(Path(folder) / name) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
        out.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    return tuple(out)


def frost(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """``c[0]`` · image + ``c[1]`` · a random H×W crop of one of frost1..frost5 (grey images get
    the crop's luma). Deviation: the crop is cut per sample (a slice per image: the photographs
    differ in size, so no single gather serves the batch)."""
    folder = frost_dir()
    if folder is None:
        raise UserError(f"frost needs the ImageNet-C frost photographs; set {FROST_ENV}")
    textures = _frost_textures(str(folder))
    b, c, h, w = images.shape
    u = draw.uniform(3, stream=501).cpu().double()
    crops = []
    for i in range(b):
        tex = textures[min(int(u[i, 0] * FROST_USED), FROST_USED - 1)]
        if tex.shape[1] <= h or tex.shape[2] <= w:
            raise UserError(
                f"frost photographs are {tuple(tex.shape[1:])} px; images {h}x{w} need more"
            )
        top, left = int(u[i, 1] * (tex.shape[1] - h)), int(u[i, 2] * (tex.shape[2] - w))
        crops.append(tex[:, top : top + h, left : left + w])
    crop = torch.stack(crops).to(images)
    crop = _grey(crop) if c == 1 else crop
    keep, add = param
    return keep * images + add * crop


def _smooth_nearest(x: Tensor, sigma: float) -> Tensor:
    """skimage ``gaussian(x, sigma)`` of ``[B, 1, H, W]``: taps out to 4σ, edges replicated
    (scipy ``mode='nearest'``); no limit on σ against the image size, unlike reflection."""
    size = 2 * int(4 * sigma + 0.5) + 1
    taps = blur_kernel(size, torch.tensor([float(sigma)], device=x.device), size).to(x)
    half = size // 2
    x = F.conv2d(F.pad(x, (half, half, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, half, half), mode="replicate"), taps.view(1, 1, -1, 1))


# spatter's colours in the reference's channel order (its x is PIL's RGB; the cv2 BGR2BGRA calls
# only append an alpha channel): water is pale turquoise, mud brown. Grey images get their luma.
_WATER, _MUD = (175, 238, 238), (63, 42, 20)
_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)


def _colour(rgb: tuple, images: Tensor) -> Tensor:
    colour = torch.tensor(rgb, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) / 255
    return _grey(colour) if images.shape[1] == 1 else colour


def _water_mask(liquid: Tensor, strength: float) -> Tensor:
    """Lines 447-461 of make_imagenet_c.py: the liquid layer to 8 bits, its Canny edges, the distance
    to them (capped at 20 px), blurred, equalised, embossed and blurred again; times the 8-bit layer,
    normalised to a maximum of ``strength`` per image. ``[B, 1, H, W]`` float64."""
    layer = (liquid.double() * 255).clamp(0, 255).floor()  # astype(uint8) truncates
    dist = cvops.distance_to(cvops.canny(layer, 50, 150), 20.0)  # 255 - Canny: edges are the zeros
    dist = cvops.box3(dist).float().floor()  # float32 blur, then astype(uint8)
    dist = cvops.equalize_hist(dist.double())
    dist = cvops.correlate(dist, _EMBOSS, "reflect").round().clamp(0, 255)  # filter2D to CV_8U
    dist = cvops.box3(dist).round()  # cv2.blur of uint8 rounds to uint8
    m = layer * dist
    return strength * m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)


def spatter(images: Tensor, param: tuple, draw: Draw) -> Tensor:
    """Water (levels 1-3) or mud (4-5) splashes: a smoothed N(loc, scale) layer (one per image,
    σ px), zero below ``threshold``; water adds turquoise by ``_water_mask``, mud covers the image with
    brown where the smoothed (σ = ``strength`` px) above-threshold mask reaches 0.8.

    ``make_imagenet_c.py`` lines 434-486 (hendrycks/robustness), step by step; cv2's Canny,
    distance transform, histogram equalisation and 8-bit filters are ``distortkd.cvops``.
    Deviations: a layer value above 1 saturates at 255 where numpy's uint8 cast would wrap (the
    smoothed layer's σ ≤ 0.4/(2√π) keeps it below 1 in practice), a water layer without any
    liquid adds nothing (the reference divides 0 by 0), and the image is not rounded to uint8.
    """
    if images.shape[1] not in (1, 3):
        raise UserError(f"spatter needs 1 or 3 channels; got {images.shape[1]} (accepted: 1, 3)")
    loc, scale, sigma, threshold, strength, mud = param
    h, w = images.shape[-2:]
    liquid = loc + scale * draw.normal(1, h, w, stream=601).to(images)  # line 442
    liquid = _smooth_nearest(liquid, sigma)  # line 444
    liquid = torch.where(liquid < threshold, 0.0, liquid)  # line 445
    if mud:  # lines 473-486
        m = _smooth_nearest((liquid > threshold).to(images), strength)
        m = torch.where(m < 0.8, 0.0, m)
        return images * (1 - m) + _colour(_MUD, images) * m
    return images + _water_mask(liquid, strength).to(images) * _colour(_WATER, images)  # line 471
