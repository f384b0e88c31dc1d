"""Representation diagnostics: known values of cosine, CKA and top-k IoU; meter == one-shot report."""

import pytest
import torch

from distortkd import diagnostics as Dg
from distortkd.errors import UserError
from distortkd.losses import attention_kl
from distortkd.vit import Features


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(batch: int, seed: int, d: int = 16, n: int = 10, heads: int = 3) -> Features:
    g = gen(seed)
    return Features(
        cls=torch.randn(batch, d, generator=g)
        + 5.0,  # a large common offset, as real CLS tokens have
        patches=torch.randn(batch, n, d, generator=g),
        attn=torch.randn(batch, heads, n, generator=g),
    )


def test_cosine_known_values():
    a = torch.randn(4, 7, 16, generator=gen())
    assert Dg.cosine(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert Dg.cosine(a[:, 0], -a[:, 0]).item() == pytest.approx(-1.0, abs=1e-6)
    e0, e1 = torch.zeros(4, 7, 16), torch.zeros(4, 7, 16)
    e0[..., 0], e1[..., 1] = 1.0, 2.0
    assert Dg.cosine(e0, e1).item() == 0.0  # orthogonal tokens
    with pytest.raises(UserError, match="one shape"):
        Dg.cosine(a, a[:, :3])


def test_cka_invariances_and_independence():
    x = torch.randn(500, 32, generator=gen(1))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen(2)))
    assert Dg.linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-12)
    assert Dg.linear_cka(x, x @ q).item() == pytest.approx(1.0, abs=1e-10)
    assert Dg.linear_cka(x, 3.0 * x + 7.0).item() == pytest.approx(1.0, abs=1e-10)
    assert Dg.linear_cka(x, x[:, :8]).item() < 0.9  # a projection is not an isometry
    assert Dg.linear_cka(x, torch.randn(500, 48, generator=gen(3))).item() < 0.15
    assert Dg.linear_cka(x.bfloat16(), x.bfloat16()).dtype == torch.float64
    with pytest.raises(UserError, match=r"\[n, d1\]"):
        Dg.linear_cka(x, x[:10])


def test_topk_iou_known_values():
    n = 20
    base = torch.full((2, 4, n), -10.0)
    a, b, c = base.clone(), base.clone(), base.clone()
    a[..., :4] = 5.0  # top 4: {0, 1, 2, 3}
    b[..., 10:14] = 5.0  # disjoint
    c[..., 2:6] = 5.0  # overlap {2, 3} of 6
    assert Dg.attention_topk_iou(a, a, 4).item() == 1.0
    assert Dg.attention_topk_iou(a, b, 4).item() == 0.0
    assert Dg.attention_topk_iou(a, c, 0.2).item() == pytest.approx(2 / 6)  # 0.2·20 = 4 patches
    # head averaging: one head strongly elsewhere does not outvote three agreeing heads
    d = a.clone()
    d[:, 0] = b[:, 0]
    assert Dg.attention_topk_iou(a, d, 4).item() == 1.0
    for bad in (0, 21, 0.0, 1.5, True):
        with pytest.raises(UserError, match="top-k"):
            Dg.attention_topk_iou(a, a, bad)


def test_report_keys_and_identity():
    f = features(8, seed=0)
    report = Dg.representation_report(f, f)
    assert list(report) == list(Dg.KEYS)
    assert report["cos_cls"] == pytest.approx(1.0, abs=1e-6)
    assert report["cos_patch"] == pytest.approx(1.0, abs=1e-6)
    assert report["cka_cls"] == pytest.approx(1.0, abs=1e-9)
    assert report["attn_kl"] == pytest.approx(0.0, abs=1e-6) and report["attn_iou"] == 1.0
    g = features(8, seed=1)
    report = Dg.representation_report(g, f, tau=2.0, k=3)
    assert report["attn_kl"] == pytest.approx(attention_kl(g.attn, f.attn, 2.0).item())
    assert report["attn_iou"] < 1.0 and report["cka_cls"] < 1.0
    cnn = Dg.representation_report(Features(cls=g.cls), Features(cls=f.cls))
    assert list(cnn) == ["cos_cls", "cka_cls"]


@pytest.mark.parametrize("full", [True, False])
def test_meter_equals_one_shot_on_concatenation(full):
    batches = [(features(b, seed=s), features(b, seed=s + 10)) for s, b in enumerate([5, 8, 3])]
    if not full:
        batches = [(Features(s.cls), Features(t.cls)) for s, t in batches]
    meter = Dg.RepresentationMeter(tau=0.5, k=0.3)
    assert meter.compute() == {}
    for student, teacher in batches:
        meter.update(student, teacher)
    cat = [
        Features(*(None if p[0] is None else torch.cat(p) for p in zip(*fs, strict=True)))
        for fs in zip(*batches, strict=True)
    ]
    expected = Dg.representation_report(cat[0], cat[1], tau=0.5, k=0.3)
    got = meter.compute()
    assert list(got) == list(expected) and len(got) == (5 if full else 2)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    meter.reset()
    meter.update(*batches[0])
    assert meter.compute() == pytest.approx(Dg.representation_report(*batches[0], tau=0.5, k=0.3))


def test_meters_of_ddp_shards_merge_to_one_meter_over_everything():
    """Two processes' meters, merged through their states, equal one meter that saw every batch."""
    batches = [(features(b, seed=s), features(b, seed=s + 10)) for s, b in enumerate([5, 8, 3, 6])]
    for student, _ in batches[2:]:  # shard 2's features sit elsewhere: its means differ from shard 1's
        student.cls.add_(3.0)
    whole, shards = Dg.RepresentationMeter(k=0.3), [Dg.RepresentationMeter(k=0.3) for _ in range(2)]
    for i, (student, teacher) in enumerate(batches):
        whole.update(student, teacher)
        shards[i // 2].update(student, teacher)
    other = shards[1].state()
    gather = lambda mine: {k: torch.stack([v, other[k]]) for k, v in mine.items()}  # noqa: E731
    expected, got = whole.compute(), shards[0].compute(gather)
    assert list(got) == list(expected) and len(got) == 5
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert shards[0].compute()["cka_cls"] != pytest.approx(expected["cka_cls"], rel=1e-3)  # unmerged
