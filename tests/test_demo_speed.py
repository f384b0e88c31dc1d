"""The demo's speed-ups keep their numbers: seeded draws made in blocks are the hash's bits at every
block boundary, and a grid's cells share the teacher's clean features without changing a diagnostic."""

import pytest
import torch
from test_seeded_draws import M32, _hash  # the hash's definition in Python ints

from distortkd import distortions, draws
from distortkd.evaluation import diagnose
from distortkd.vit import FrozenTeacher, build_vit


def _reference_uniform(seed: int, index: int, stream: int) -> float:
    """``Draw.uniform``'s number ``index`` of ``stream`` for one sample, in Python ints."""
    mixed = _hash((seed & M32) ^ _hash((seed >> 32) & M32))
    key = _hash((index + stream * 0x9E3779B9) & M32)
    return ((_hash(_hash(key ^ mixed)) >> 9) + 0.5) * 2.0**-23


@pytest.mark.parametrize("chunk", [5, 30, 1 << 16])  # one row per block, 2 rows + a short last block, one block
def test_blocked_seeded_draw_is_the_hash_at_every_element(monkeypatch, chunk):
    monkeypatch.setattr(draws, "_CHUNK", chunk)
    seeds = torch.tensor([0, 1, -1, 2**40 + 7, -(2**62) + 3, 123456789, 2**32 - 1])
    u = draws.Draw(torch.zeros(7, 1, 2, 2), seeds).uniform(3, 4, stream=221)
    assert u.shape == (7, 3, 4) and u.dtype == torch.float32
    expected = [[_reference_uniform(s, i, 221) for i in range(12)] for s in seeds.tolist()]
    assert u.reshape(7, 12).tolist() == expected


class _Counting(FrozenTeacher):
    """A frozen teacher that counts the images its ``features`` sees."""

    seen = 0

    def features(self, images, with_attn=True):
        type(self).seen += len(images)
        return super().features(images, with_attn)


class _Batches:
    """What ``diagnose`` reads of a datamodule: an unshuffled test loader, through
    ``device_batches``."""

    def __init__(self, images):
        self.images = images

    def test_dataloader(self):
        return [{"image": self.images[i:i + 4], "index": torch.arange(i, i + 4)} for i in (0, 4)]

    def device_batches(self, loader, device):
        yield from loader


def test_grid_cells_share_the_teachers_clean_features_and_get_the_same_diagnostics():
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    student = build_vit("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    teacher = _Counting(build_vit("vit_tiny_patch16_224", pretrained=False, **kw))
    data = _Batches(torch.rand(8, 1, 28, 28))
    cells = [distortions.at_severity("gaussian_noise", 0.5), distortions.at_severity("mask", 0.9)]
    alone = [diagnose(student, teacher, data, d, 0, 2, "cpu") for d in cells]
    _Counting.seen, cache = 0, {}
    shared = [diagnose(student, teacher, data, d, 0, 2, "cpu", cache) for d in cells]
    assert shared == alone
    # per cell the teacher sees the 8 distorted images; the 8 clean ones once for the whole grid
    assert _Counting.seen == 8 * len(cells) + 8
