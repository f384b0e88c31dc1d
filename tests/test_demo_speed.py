"""The demo's speed-ups keep their numbers: seeded draws made in blocks are the hash's bits at every
block boundary, a grid's cells share the teacher's clean features without changing a diagnostic,
the diagnostics read the test pass's own distorted batch without changing its top-1, and fog's
plasma maps made a few at a time are the maps of the whole batch."""

import pytest
import torch
from test_seeded_draws import M32, _hash  # the hash's definition in Python ints

from distortkd import distortions, draws
from distortkd.evaluation import Diagnostics
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


def _diagnose(student, teacher, images, dist, cache=None):
    """A test pass's observer calls over two unshuffled batches of 4 (what ``test_step`` does)."""
    diag = Diagnostics(teacher, 2, cache)
    for i in (0, 1):
        x, idx = images[4 * i:4 * i + 4], torch.arange(4 * i, 4 * i + 4)
        distorted = dist(x, draws.sample_seeds(idx, 0))
        diag(i, x, distorted, student.features(distorted))
    return diag.compute()


def test_grid_cells_share_the_teachers_clean_features_and_get_the_same_diagnostics():
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    student = build_vit("vit_tiny_patch16_224", pretrained=False, **kw).eval()
    teacher = _Counting(build_vit("vit_tiny_patch16_224", pretrained=False, **kw))
    images = torch.rand(8, 1, 28, 28)
    cells = [distortions.at_severity("gaussian_noise", 0.5), distortions.at_severity("mask", 0.9)]
    alone = [_diagnose(student, teacher, images, d) for d in cells]
    _Counting.seen, cache = 0, {}
    shared = [_diagnose(student, teacher, images, d, cache) for d in cells]
    assert shared == alone
    # per cell the teacher sees the 8 distorted images; the 8 clean ones once for the whole grid
    assert _Counting.seen == 8 * len(cells) + 8


def test_test_pass_with_diagnostics_keeps_top1_and_measures_its_own_distorted_batch():
    """The observer sees exactly the images the accuracy was computed on, and top-1 is that of a
    plain test pass (the head reads features().cls, which is forward())."""
    import lightning as L

    from distortkd.modules import FinetuneModule

    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    module = FinetuneModule(build_vit("vit_tiny_patch16_224", pretrained=False, **kw), 10,
                            distortions.at_severity("gaussian_noise", 0.5), optimizer=None).eval()
    teacher = FrozenTeacher(build_vit("vit_tiny_patch16_224", pretrained=False, **kw))
    images, labels = torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,))
    loader = [{"image": images[i:i + 4], "label": labels[i:i + 4], "index": torch.arange(i, i + 4)}
              for i in (0, 4, 8)]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    batches = torch.utils.data.DataLoader(loader, batch_size=None)  # the list, batch by batch
    plain = trainer.test(module, dataloaders=batches, verbose=False)[0]["test/acc1"]
    seen = []
    diag = Diagnostics(teacher, 2)
    module.test_observer = lambda i, x, xd, f: (seen.append((i, xd)), diag(i, x, xd, f))
    observed = trainer.test(module, dataloaders=batches, verbose=False)[0]["test/acc1"]
    assert observed == plain
    assert [i for i, _ in seen] == [0, 1, 2]
    for i, xd in seen:  # the distorted batch is the cell's seeded distortion of that batch
        b = loader[i]
        assert torch.equal(xd, module.distortion(b["image"], module.seeds(b)))
    assert diag.compute() == _diagnose(module.encoder, teacher, images[:8], module.distortion)


def test_draw_rows_are_the_rows_of_the_whole_draw():
    seeds = torch.tensor([3, 1, 4, 1, 5, 9, 2])
    whole = draws.Draw(torch.zeros(7, 1, 2, 2), seeds)
    for start, stop in ((0, 3), (3, 7), (5, 99)):
        sub = whole.rows(start, stop)
        assert sub.batch == len(seeds[start:stop])
        assert torch.equal(sub.uniform(2, 3, stream=7), whole.uniform(2, 3, stream=7)[start:stop])
    assert draws.Draw(torch.zeros(7, 1, 2, 2), None).rows(2, 6).uniform(3, stream=0).shape == (4, 3)


@pytest.mark.parametrize("maps_per_chunk", [1, 3, 64])  # one map, chunks across the batch, one chunk
def test_fog_in_chunks_is_fog_in_one_batch(monkeypatch, maps_per_chunk):
    from distortkd import imagenetc_extra

    images = torch.rand(5, 1, 12, 12)
    seeds = torch.arange(5) * 7919
    one = imagenetc_extra.fog(images, (1.5, 2), draws.Draw(images, seeds))
    monkeypatch.setattr(imagenetc_extra, "_FOG_BYTES", maps_per_chunk * 256 * 256 * 8)
    assert torch.equal(imagenetc_extra.fog(images, (1.5, 2), draws.Draw(images, seeds)), one)


def _job(student, teacher, images, cells, memo):
    """One sweep job's grid: each cell's seeded distortion and diagnostics, through ``memo``."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_yaml(OmegaConf.create({"name": "tiny", "embed_dim": 32}))
    on_distorted = memo.teacher(teacher, spec)
    out, clean_cache = [], {}  # the grid's, per job
    for dist in cells:
        diag = Diagnostics(teacher, 2, clean_cache, on_distorted)
        call = memo.distortion(dist)
        for i in (0, 1):
            x, idx = images[4 * i:4 * i + 4], torch.arange(4 * i, 4 * i + 4)
            distorted = call(x, draws.sample_seeds(idx, 0))
            diag(i, x, distorted, student.features(distorted))
        out.append(diag.compute())
    return out


def test_memo_shares_one_sweeps_corruptions_and_teacher_features_without_changing_a_diagnostic(monkeypatch):
    """Two jobs of a sweep (two students, each with its own copy of the teacher, as Hydra builds
    them): with the memo, the second job neither corrupts nor runs the teacher on the distorted
    images again, and every diagnostic is the one computed without it."""
    from distortkd.evaluation import Memo

    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    students = [build_vit("vit_tiny_patch16_224", pretrained=False, **kw).eval() for _ in range(2)]
    weights = build_vit("vit_tiny_patch16_224", pretrained=False, **kw).state_dict()

    def teacher():  # a fresh object per job, the same weights
        t = _Counting(build_vit("vit_tiny_patch16_224", pretrained=False, **kw))
        t.encoder.load_state_dict(weights)
        return t

    images = torch.rand(8, 1, 28, 28)
    cells = [distortions.at_severity("gaussian_noise", 0.5), distortions.at_severity("gaussian_noise", 0.75),
             distortions.at_severity("mask", 0.9)]
    applied = []
    for cls in {type(c) for c in cells}:
        monkeypatch.setattr(cls, "apply", (lambda f: lambda self, x, d: (applied.append(self), f(self, x, d))[1])(cls.apply))
    plain = [_job(s, teacher(), images, cells, Memo(0)) for s in students]
    assert len(applied) == 2 * len(cells) * 2  # jobs × cells × batches
    applied.clear()
    _Counting.seen = 0
    memo = Memo(1 << 30)
    shared = [_job(s, teacher(), images, cells, memo) for s in students]
    assert shared == plain
    assert len(applied) == len(cells) * 2  # the first job only
    # the teacher: the clean batches once per job (the grid's clean cache), the distorted ones once
    assert _Counting.seen == 2 * 8 + len(cells) * 8
    assert (memo.hits, memo.misses) == (2 * len(cells) * 2, 2 * len(cells) * 2)


def test_memo_never_returns_another_settings_result():
    """Another severity, other seeds, other images, another teacher (weights, input normalisation
    or architecture) miss; unseeded draws and distortions whose repr may hide a setting are never
    kept; past its cap the memo computes without keeping."""
    from dataclasses import dataclass

    from distortkd.evaluation import Memo
    from distortkd.vit import FrozenTeacher

    memo = Memo(1 << 30)
    x, seeds = torch.rand(4, 1, 28, 28), torch.arange(4)
    noise = memo.distortion(distortions.at_severity("gaussian_noise", 0.5))
    a = noise(x, seeds)
    assert torch.equal(noise(x, seeds), a) and memo.hits == 1
    for other in (memo.distortion(distortions.at_severity("gaussian_noise", 0.75))(x, seeds),
                  noise(x, seeds + 1), noise(x.flip(0), seeds)):
        assert not torch.equal(other, a)
    assert memo.hits == 1
    assert not torch.equal(noise(x), noise(x))  # unseeded: a fresh draw every call

    @dataclass(frozen=True)
    class Hidden(distortions.Distortion):  # keeps a setting outside its fields
        def __init__(self, k):
            object.__setattr__(self, "k", k)

        def apply(self, images, draw):
            return images * self.k

    hidden = Hidden(2.0)
    assert memo.distortion(hidden) is hidden
    stranger = lambda images, seeds=None: images  # noqa: E731
    assert memo.distortion(stranger) is stranger

    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_classes=0)
    base = FrozenTeacher(build_vit("vit_tiny_patch16_224", pretrained=False, num_heads=2, **kw))
    ref = memo.teacher(base, "heads: 2")(x).cls
    moved = FrozenTeacher(build_vit("vit_tiny_patch16_224", pretrained=False, num_heads=2, **kw))
    moved.load_state_dict(base.state_dict())
    moved.encoder.mean.fill_(0.25)  # a buffer outside state_dict: the input normalisation
    four = FrozenTeacher(build_vit("vit_tiny_patch16_224", pretrained=False, num_heads=4, **kw))
    four.load_state_dict(base.state_dict())  # same shapes, another architecture
    for teacher, spec in ((moved, "heads: 2"), (four, "heads: 4")):
        assert not torch.equal(memo.teacher(teacher, spec)(x).cls, ref)
    hits = memo.hits
    assert torch.equal(memo.teacher(base, "heads: 2")(x).cls, ref) and memo.hits == hits + 1

    tiny = Memo(100)  # smaller than one batch: nothing kept, every result still computed
    noisy = tiny.distortion(distortions.at_severity("gaussian_noise", 0.5))
    assert torch.equal(noisy(x, seeds), a) and torch.equal(noisy(x, seeds), a)
    assert (tiny.hits, tiny.misses, tiny.bytes) == (0, 2, 0)
    assert Memo(0).distortion(noise) is noise


def test_memo_evicts_earlier_jobs_first_and_never_the_current_one():
    """A sweep over seeds × methods: seed 1's cells replace seed 0's (which no later job reads),
    so seed 1's second method hits every cell; a job larger than the memo keeps its first cells
    (a sequential scan would otherwise evict each cell the next job reads first)."""
    from distortkd.evaluation import Memo

    cell = torch.zeros(256)  # 1 KiB a cell
    memo = Memo(4 * cell.nbytes)

    def job(seed, cells=4):
        memo.new_job()
        before = memo.hits
        for i in range(cells):
            memo.get(("cell", seed, i), lambda: cell.clone())
        return memo.hits - before

    assert [job(0), job(0), job(1), job(1)] == [0, 4, 0, 4]
    assert memo.bytes == 4 * cell.nbytes
    assert [job(2, cells=6), job(2, cells=6)] == [0, 4]  # the first 4 of 6 kept
