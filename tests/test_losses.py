"""Losses: zero on identical inputs, positive otherwise, gradients, decrease under SGD."""

import math

import pytest
import torch

from distortkd.errors import UserError
from distortkd.losses import (
    attention_kl,
    cls_mse,
    contrastive_inversion_loss,
    multilevel_loss,
    patch_mse,
)
from distortkd.vit import Features, FrozenTeacher


def _feats(seed, b=4, n=16, d=8, h=2):
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(b, d, generator=g), torch.randn(b, n, d, generator=g),
                    torch.randn(b, h, n, generator=g) * 3)


def test_zero_for_identical_positive_otherwise():
    a, b = _feats(0), _feats(1)
    out = multilevel_loss(a, a, 1, 1, 1, 0.5)
    assert all(v.item() == pytest.approx(0, abs=1e-6) for v in out.values())
    out = multilevel_loss(a, b, 1, 1, 1, 0.5)
    assert all(v.item() > 0 for v in out.values())
    assert set(out) == {"loss", "loss/cls", "loss/patch", "loss/attn"}
    assert contrastive_inversion_loss(a.cls, b.cls)["loss"] > contrastive_inversion_loss(a.cls, a.cls)["loss"]


def test_weights_combine_and_zero_weight_skips(monkeypatch):
    a, b = _feats(0), _feats(1)
    out = multilevel_loss(a, b, 2.0, 3.0, 5.0, 1.0)
    expected = 2 * cls_mse(a.cls, b.cls) + 3 * patch_mse(a.patches, b.patches) + 5 * attention_kl(a.attn, b.attn, 1.0)
    torch.testing.assert_close(out["loss"], expected)
    import distortkd.losses as L

    monkeypatch.setattr(L, "attention_kl", lambda *a: (_ for _ in ()).throw(AssertionError("computed")))
    out = L.multilevel_loss(a._replace(attn=None), b._replace(attn=None), 1, 1, 0, 1)
    assert out["loss/attn"].item() == 0


def test_attention_kl_matches_definition_and_handles_zero_probability():
    s, t = torch.randn(3, 2, 10), torch.randn(3, 2, 10)
    tau = 0.7
    p, q = (t / tau).softmax(-1), (s / tau).softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(attention_kl(s, t, tau), ref)
    t[..., 0] = -1e9  # teacher gives a patch zero probability: no NaN
    assert torch.isfinite(attention_kl(s, t, tau))
    with pytest.raises(ValueError, match="tau=0"):
        attention_kl(s, t, 0)


def test_attention_kl_fp32_under_bf16_inputs():
    s, t = torch.randn(2, 2, 10).bfloat16(), torch.randn(2, 2, 10).bfloat16()
    assert attention_kl(s, t, 1.0).dtype == torch.float32


def test_contrastive_is_one_way_infonce():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    sn, tn = torch.nn.functional.normalize(s, dim=-1), torch.nn.functional.normalize(t, dim=-1)
    logits = sn @ tn.T / 0.1
    ref = -(logits.diag() - logits.logsumexp(1)).mean()
    torch.testing.assert_close(contrastive_inversion_loss(s, t, 0.1)["loss"], ref)


def test_gradients_reach_only_student(tiny_vit):
    import copy

    teacher = FrozenTeacher(copy.deepcopy(tiny_vit))
    x = torch.rand(2, 3, 32, 32)
    loss = multilevel_loss(tiny_vit.features(x * 0.5), teacher.features(x), 1, 1, 1, 1)["loss"]
    loss.backward()
    assert all(p.grad is not None for p in tiny_vit.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("term", ["cls", "patch", "attn", "all", "contrastive"])
def test_each_loss_decreases_under_sgd(tiny_vit, term):
    import copy

    teacher = FrozenTeacher(copy.deepcopy(tiny_vit))
    torch.manual_seed(1)
    for p in tiny_vit.parameters():  # start the student away from the teacher
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.rand(8, 3, 32, 32)
    w = {"cls": (1, 0, 0), "patch": (0, 1, 0), "attn": (0, 0, 1), "all": (1, 1, 1)}.get(term)
    opt = torch.optim.SGD(tiny_vit.parameters(), lr=0.05 if term != "attn" else 0.5)
    losses = []
    for _ in range(20):
        if term == "contrastive":
            loss = contrastive_inversion_loss(tiny_vit(x), teacher(x))["loss"]
        else:
            loss = multilevel_loss(tiny_vit.features(x), teacher.features(x), *w, tau=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def _hand_one_way(s, t, tau):
    """-1/N Σ_i log(exp(cos(s_i, t_i)/τ) / Σ_j exp(cos(s_i, t_j)/τ)), written out with loops."""
    n, total = len(s), 0.0
    for i in range(n):
        denom = sum(math.exp(_cos(s[i], t[j]) / tau) for j in range(n))
        total -= math.log(math.exp(_cos(s[i], t[i]) / tau) / denom)
    return total / n


def _hand_symmetric(s, t, tau):
    """NT-Xent over the 2N embeddings z = (s_0..s_{N-1}, t_0..t_{N-1}): anchor i's positive is its
    pair, its denominator every z_k with k != i; mean over the 2N anchors. Written out with loops."""
    z, n = [*s, *t], len(s)
    total = 0.0
    for i in range(2 * n):
        pair = i + n if i < n else i - n
        denom = sum(math.exp(_cos(z[i], z[k]) / tau) for k in range(2 * n) if k != i)
        total -= math.log(math.exp(_cos(z[i], z[pair]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("variant,hand", [("one_way", _hand_one_way), ("symmetric", _hand_symmetric)])
def test_contrastive_variants_match_hand_written_formula(variant, hand):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    for tau in (0.1, 0.5):
        got = contrastive_inversion_loss(s, t, tau, variant=variant)
        assert got["loss"].item() == pytest.approx(hand(s, t, tau), rel=1e-5)
        assert got["loss/nce"].item() == got["loss"].item()


def test_symmetric_differs_from_one_way_and_unknown_variant_names_accepted():
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    one, sym = (contrastive_inversion_loss(s, t, 0.1, variant=v)["loss"] for v in ("one_way", "symmetric"))
    assert abs(one.item() - sym.item()) > 1e-3
    with pytest.raises(UserError) as err:
        contrastive_inversion_loss(s, t, 0.1, variant="both_ways")
    msg = str(err.value)
    assert "'both_ways'" in msg and "accepted: one_way, symmetric" in msg and "\n" not in msg


def test_symmetric_decreases_under_sgd(tiny_vit):
    import copy

    teacher = FrozenTeacher(copy.deepcopy(tiny_vit))
    torch.manual_seed(1)
    for p in tiny_vit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.rand(8, 3, 32, 32)
    opt = torch.optim.SGD(tiny_vit.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = contrastive_inversion_loss(tiny_vit(x * 0.5), teacher(x), variant="symmetric")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


# --- a loss says what it reads; training and validation run the same step -------------------------

def _spy_encoders(tiny_vit):
    """A student and a frozen teacher whose ``features`` calls and plain forwards are recorded."""
    import copy

    calls = []
    student, teacher_enc = tiny_vit, copy.deepcopy(tiny_vit)
    for who, enc in (("student", student), ("teacher", teacher_enc)):
        features, forward = enc.features, enc.forward
        enc.features = lambda x, with_attn=True, who=who, f=features: (
            calls.append((who, "features", with_attn)) or f(x, with_attn))
        enc.forward = lambda x, who=who, f=forward: calls.append((who, "forward", None)) or f(x)
    return student, FrozenTeacher(teacher_enc), calls


@pytest.mark.parametrize("name, params, needs", [
    ("multilevel", {"alpha": 1.0, "beta": 1.0, "gamma": 10.0, "tau": 2.0}, "attention"),
    ("multilevel", {"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "tau": 2.0}, "tokens"),
    ("multilevel", {"alpha": 1.0}, "attention"),  # γ defaults to 1, as in multilevel_loss
    ("contrastive", {"tau": 0.1, "variant": "symmetric"}, "embeddings"),
])
def test_the_step_computes_what_the_loss_reads(tiny_vit, name, params, needs):
    from distortkd.distortions import build
    from distortkd.losses import make_loss
    from distortkd.steps import distill_loss

    loss = make_loss(name, **params)
    assert loss.needs == needs
    student, teacher, calls = _spy_encoders(tiny_vit)
    out = distill_loss(student, teacher, build("noise_strong"), loss, torch.rand(4, 3, 32, 32))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    if needs == "embeddings":
        assert {c[1] for c in calls} == {"forward"}  # pooled embeddings only, no token taps
    else:
        assert sorted(calls) == [("student", "features", needs == "attention"),
                                 ("teacher", "features", needs == "attention")]


def test_unknown_loss_names_the_accepted_ones():
    from distortkd.losses import make_loss

    with pytest.raises(UserError, match="unknown loss function 'multilevl'; accepted: contrastive, multilevel"):
        make_loss("multilevl")


@pytest.mark.parametrize("name", ["multilevel", "contrastive"])
def test_validation_runs_the_training_step_then_the_diagnostics(tiny_vit, monkeypatch, name):
    """``val/loss`` is the training step's loss on the same images and seeds; the diagnostics
    read the features of that same call (attention taps included)."""
    import copy

    from distortkd import modules
    from distortkd.distortions import build
    from distortkd.draws import sample_seeds
    from distortkd.losses import make_loss
    from distortkd.steps import distill_loss

    params = {"gamma": 0.0} if name == "multilevel" else {"tau": 0.1}
    module = modules.DistillModule(tiny_vit, copy.deepcopy(tiny_vit), build("noise_strong"),
                                   make_loss(name, **params), optimizer=torch.optim.SGD)
    steps, real = [], modules.distill_step
    monkeypatch.setattr(modules, "distill_step", lambda *a, **k: steps.append(k) or real(*a, **k))
    logged = {}
    monkeypatch.setattr(module, "log", lambda key, value, **_: logged.__setitem__(key, value))
    monkeypatch.setattr(module, "log_dict", lambda d, **_: logged.update(d))
    batch = {"image": torch.rand(4, 3, 32, 32), "index": torch.arange(4)}
    module.eval()
    module.validation_step(batch, 0)
    assert steps == [{"taps": "attention"}]  # one step; the diagnostics' taps in the same pass
    seeds = sample_seeds(batch["index"], module.eval_seed)
    expected = distill_loss(module.student, module.teacher, module.distortion, module.loss,
                            batch["image"], seeds, module.to_teacher)["loss"]
    torch.testing.assert_close(logged["val/loss"], expected)
    assert "val/attn_kl" in logged and module.meters["student"]._n == 4
