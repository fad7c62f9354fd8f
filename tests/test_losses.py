"""The losses against brute-force references, their optima, limits and low-precision safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES

from fasttt.losses import (
    cp_loss,
    cross_entropy,
    eta_from_u,
    lsr_loss,
    patriarch_ce_weight,
    patriarch_loss_name,
    patriarch_objective,
    student_loss,
    tsd_loss,
    u_from_eta,
)
from fasttt.teachers import TopKTeacher

K = 5


def _half(teacher: TopKTeacher) -> TopKTeacher:
    """The teacher with its kept logits stored as float16, as a float16 cache holds them."""
    return TopKTeacher(teacher.values.half(), teacher.ids, teacher.log_partition,
                       teacher.temperature)


def _batch(batch=8, classes=10, scale=3.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=gen) * scale
    labels = torch.randint(0, classes, (batch,), generator=gen)
    return logits.to(device), labels.to(device)


# ---------------------------------------------------------------- u <-> eta

def test_paper_example_u_06_gives_eta_0428571():
    assert eta_from_u(0.6, 5) == pytest.approx(0.75 / 1.75, abs=1e-12)
    assert round(eta_from_u(0.6, 5), 6) == 0.428571


@pytest.mark.parametrize("u", [0.05, 0.3, 0.6, 0.7, 0.8, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("k", [2, 5, 10])
def test_u_eta_round_trip(u, k):
    assert u_from_eta(eta_from_u(u, k), k) == pytest.approx(u, abs=1e-12)


def test_u_is_one_for_eta_at_or_above_saturation_and_one_means_ce():
    assert u_from_eta(K / (2 * K - 1), K) == pytest.approx(1.0)
    assert u_from_eta(0.9, K) == 1.0
    assert eta_from_u(1.0, K) == 1.0


@pytest.mark.parametrize("bad", [lambda: eta_from_u(1.2, 5), lambda: eta_from_u(0.5, 1),
                                 lambda: u_from_eta(-0.1, 5)])
def test_out_of_range_u_eta_k_rejected(bad):
    with pytest.raises(ValueError):
        bad()


# ---------------------------------------------------------------- TSD

def _tsd_reference(logits, labels, eta, k):
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        exps = [math.exp(z - max(row)) for z in row]
        probs = [e / sum(exps) for e in exps]
        top = sorted(probs, reverse=True)[:k]
        penalty = top[0] - sum(top[1:]) / (k - 1)
        total += eta * -math.log(probs[label]) + (1 - eta) * penalty
    return total / len(labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 5, 10])
def test_tsd_matches_brute_force(k, device):
    logits, labels = _batch(device=device)
    eta = eta_from_u(0.6, k)
    loss, parts = tsd_loss(logits, labels, eta, k)
    assert loss.item() == pytest.approx(_tsd_reference(logits, labels, eta, k), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert not parts["tsd"].requires_grad


@pytest.mark.parametrize("u", [0.6, 0.7, 0.8])
def test_minimising_tsd_drives_top1_confidence_to_u(u):
    torch.manual_seed(0)
    logits = (0.1 * torch.randn(1, 10)).requires_grad_()
    labels = torch.tensor([3])
    eta = eta_from_u(u, K)
    opt = torch.optim.Adam([logits], lr=0.02)
    for _ in range(3000):
        opt.zero_grad()
        tsd_loss(logits, labels, eta, K)[0].backward()
        opt.step()
    probs = logits.detach().softmax(dim=1)[0]
    assert probs.max().item() == pytest.approx(u, abs=0.01)
    assert probs.argmax().item() == 3
    # the rest of the mass sits in the next K - 1 classes, none above the primary
    assert probs.topk(K).values.sum().item() == pytest.approx(1.0, abs=0.01)


def test_tsd_gradient_flows_through_sorted_scores():
    logits, labels = _batch()
    logits.requires_grad_()
    tsd_loss(logits, labels, 0.0, K)[0].backward()  # eta = 0: the penalty term alone
    assert logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- LSR, CP, eta = 1

def test_lsr_term_is_kl_from_uniform():
    logits, labels = _batch()
    p = logits.softmax(dim=1)
    by_hand = (0.1 * torch.log(0.1 / p)).sum(dim=1).mean()
    _, parts = lsr_loss(logits, labels, 0.5)
    assert parts["lsr"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss, _ = lsr_loss(logits, labels, 0.3)
    expected = 0.3 * F.cross_entropy(logits, labels) + 0.7 * by_hand
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cp_term_is_negative_entropy():
    logits, labels = _batch()
    p = logits.softmax(dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    _, parts = cp_loss(logits, labels, 0.5)
    assert parts["cp"].item() == pytest.approx(-entropy.item(), rel=1e-5)
    loss, _ = cp_loss(logits, labels, 0.3)
    expected = 0.3 * F.cross_entropy(logits, labels) - 0.7 * entropy
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("loss_fn", [lambda z, y, e: tsd_loss(z, y, e, K), lsr_loss, cp_loss])
def test_eta_one_is_plain_cross_entropy(loss_fn):
    logits, labels = _batch()
    eta = eta_from_u(1.0, K)
    loss, _ = loss_fn(logits, labels, eta)
    ce, parts = cross_entropy(logits, labels)
    assert torch.equal(loss, F.cross_entropy(logits, labels))
    assert torch.equal(ce, loss) and torch.equal(parts["ce"], loss)


def test_eta_one_is_ce_even_where_the_term_is_infinite():
    logits, labels = _batch()
    logits[:, -1] = -math.inf  # a masked class: KL(uniform || p) = inf
    labels = labels.clamp(max=logits.shape[1] - 2)
    loss, parts = lsr_loss(logits, labels, 1.0)
    assert torch.isinf(parts["lsr"])
    assert torch.equal(loss, F.cross_entropy(logits, labels))


@pytest.mark.parametrize("kind", ["tsd", "lsr", "cp"])
def test_the_patriarchs_ce_weight_and_the_loss_it_really_trains_with(kind):
    # Without eta, the CE weight comes from u by TSD's optimum; u = 1 gives plain CE.
    assert patriarch_ce_weight(0.6, K) == pytest.approx(eta_from_u(0.6, K))
    assert patriarch_ce_weight(1.0, K) == 1.0
    assert patriarch_loss_name(kind, 0.6, K) == kind
    assert patriarch_loss_name(kind, 1.0, K) == "ce"
    # An explicit eta wins over u: u = 1 with eta 0.9 still trains with the softened loss.
    assert patriarch_ce_weight(1.0, K, 0.9) == 0.9
    assert patriarch_loss_name(kind, 1.0, K, 0.9) == kind
    assert patriarch_loss_name(kind, 0.6, K, 1.0) == "ce"
    assert patriarch_loss_name("ce", 0.6, K, 0.9) == "ce"
    logits, labels = _batch()
    softened = {"tsd": lambda: tsd_loss(logits, labels, 0.9, K),
                "lsr": lambda: lsr_loss(logits, labels, 0.9),
                "cp": lambda: cp_loss(logits, labels, 0.9)}[kind]()
    loss, _ = patriarch_objective(kind, 1.0, K, 0.9)(logits, labels, None)
    assert torch.equal(loss, softened[0]) and not torch.equal(loss, F.cross_entropy(logits,
                                                                                      labels))
    loss, _ = patriarch_objective(kind, 1.0, K)(logits, labels, None)
    assert torch.equal(loss, F.cross_entropy(logits, labels))


# ---------------------------------------------------------------- student

def test_student_lam_one_is_exactly_ce_even_with_extreme_teacher():
    logits, labels = _batch()
    logits.requires_grad_()
    teacher = torch.full_like(logits, -math.inf)
    teacher[:, 0] = 1e4  # one-hot teacher with -inf elsewhere: 0 log 0 terms
    for t in (teacher, TopKTeacher.from_logits(teacher, 1)):
        loss, parts = student_loss(logits, labels, t, lam=1.0)
        assert torch.equal(loss, F.cross_entropy(logits, labels))
        assert torch.isfinite(parts["kl"])
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_student_kl_is_zero_against_itself(temperature):
    logits, labels = _batch()
    for teacher in (logits.clone(), TopKTeacher.from_logits(logits, 3, temperature)):
        loss, parts = student_loss(logits, labels, teacher, lam=0.0, temperature=temperature)
        assert abs(parts["kl"].item()) < 1e-6
        assert abs(loss.item()) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_student_kl_matches_torch_kl_div(temperature, device):
    logits, labels = _batch(seed=1, device=device)
    teacher, _ = _batch(seed=2, device=device)
    log_s = (logits / temperature).log_softmax(dim=1)
    p_t = (teacher / temperature).softmax(dim=1)
    reference = F.kl_div(log_s, p_t, reduction="batchmean")
    loss, parts = student_loss(logits, labels, teacher, lam=0.0, temperature=temperature)
    assert parts["kl"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert loss.item() == pytest.approx(temperature**2 * reference.item(), rel=1e-5)
    mixed, _ = student_loss(logits, labels, teacher, lam=0.6, temperature=temperature)
    expected = 0.6 * F.cross_entropy(logits, labels) + 0.4 * temperature**2 * reference
    assert mixed.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_topk_at_all_classes_equals_full_kl(temperature, device):
    logits, labels = _batch(classes=20, seed=3, device=device)
    teacher, _ = _batch(classes=20, seed=4, device=device)
    full, full_parts = student_loss(logits, labels, teacher, 0.4, temperature)
    topk = TopKTeacher.from_logits(teacher, 20, temperature)
    loss, parts = student_loss(logits, labels, topk, 0.4, temperature)
    torch.testing.assert_close(parts["kl"], full_parts["kl"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)


def _per_sample_kl(logits, teacher):
    labels = torch.zeros(1, dtype=torch.long)
    return torch.stack([student_loss(logits[i:i + 1], labels, _row(teacher, i), 0.0)[1]["kl"]
                        for i in range(logits.shape[0])])


def _row(teacher, i):
    if isinstance(teacher, TopKTeacher):
        return TopKTeacher(teacher.values[i:i + 1], teacher.ids[i:i + 1],
                           teacher.log_partition[i:i + 1], teacher.temperature)
    return teacher[i:i + 1]


def test_topk_kl_bound_and_gap_shrinks_with_k():
    """Stated bound: full - topk = q_tail KL(q|tail || s|tail) >= 0, nonincreasing in k."""
    classes = 50
    logits, _ = _batch(batch=6, classes=classes, seed=5)
    teacher, _ = _batch(batch=6, classes=classes, seed=6)
    full = _per_sample_kl(logits, teacher)
    previous = None
    for k in (1, 2, 5, 10, 20, 40, 49, 50):
        tk = TopKTeacher.from_logits(teacher, k)
        gap = full - _per_sample_kl(logits, tk)
        assert (gap >= -1e-5).all(), (k, gap)
        # the gap is exactly the teacher's tail mass times the KL of the tail-conditionals
        tail = torch.ones_like(teacher, dtype=torch.bool).scatter_(1, tk.ids, False)
        q, s = teacher.softmax(dim=1), logits.softmax(dim=1)
        q_tail = (q * tail).sum(dim=1)
        if k < classes:
            qc = q * tail / q_tail[:, None]
            sc = s * tail / (s * tail).sum(dim=1, keepdim=True)
            expected = q_tail * torch.where(tail, qc * (qc / sc).log(), 0).sum(dim=1)
        else:
            expected = torch.zeros_like(gap)
        torch.testing.assert_close(gap, expected, rtol=1e-4, atol=2e-5)
        if previous is not None:
            assert (gap <= previous + 1e-5).all(), (k, gap, previous)
        previous = gap
    assert previous.abs().max() < 1e-5
    assert (_per_sample_kl(logits, TopKTeacher.from_logits(teacher, 1)) < full).all()


@pytest.mark.parametrize("device", DEVICES)
def test_topk_tail_edges_are_finite(device):
    logits, labels = _batch(classes=10, device=device)
    logits.requires_grad_()
    teacher = torch.zeros(8, 10, device=device)
    teacher[:, 0] = 200.0  # the teacher's tail underflows to exactly zero mass
    student_peaked = torch.zeros(8, 10, device=device)
    student_peaked[:, :3] = 60.0  # the student's tail is ~e^-60, far below 1 - sum resolution
    student_peaked.requires_grad_()
    # a teacher whose kept ids are the student's peak, with real mass (~1e-4) in its tail
    confident = torch.randn(8, 10, generator=torch.Generator().manual_seed(9)).to(device)
    confident[:, :3] += 10.0
    cases = [(logits, TopKTeacher.from_logits(teacher, 1)),
             (logits, _half(TopKTeacher.from_logits(teacher, 10))),
             (student_peaked, TopKTeacher.from_logits(confident, 3)),
             (student_peaked, _half(TopKTeacher.from_logits(confident, 3)))]
    for z, t in cases:
        loss, parts = student_loss(z, labels, t, 0.5)
        assert torch.isfinite(loss) and parts["kl"] >= -1e-6
        loss.backward()
        assert torch.isfinite(z.grad).all()
        z.grad = None
    # the student's tail log-mass is exact, not clipped or -inf
    deeper = student_peaked.detach().clone()
    deeper[:, :3] = 80.0
    t = TopKTeacher.from_logits(confident, 3)
    assert set(t.ids.flatten().tolist()) == {0, 1, 2}
    kl60 = student_loss(student_peaked, labels, t, 0.0)[1]["kl"]
    kl80 = student_loss(deeper, labels, t, 0.0)[1]["kl"]
    # 20 more nats of student tail deficit cost exactly 20 * (teacher tail mass)
    q_tail = confident.softmax(dim=1)[:, 3:].sum(dim=1).mean()
    assert (kl80 - kl60).item() == pytest.approx(20 * q_tail.item(), rel=1e-2)


def test_topk_teacher_temperature_mismatch_and_shapes_rejected():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="temperature"):
        student_loss(logits, labels, TopKTeacher.from_logits(logits, 3, 2.0), 0.5, 1.0)
    with pytest.raises(ValueError):
        TopKTeacher(torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.zeros(4))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_teacher_from_logits_probabilities_are_exact(device):
    teacher, _ = _batch(classes=30, seed=7, device=device)
    exact = TopKTeacher.from_logits(teacher, 4, temperature=2.0)
    assert exact.values.dtype == teacher.dtype and exact.log_partition.dtype == torch.float32
    assert exact.ids.equal(teacher.topk(4, dim=1).indices) and exact.temperature == 2.0
    for tk, rtol in ((exact, 1e-5), (_half(exact), 2e-3)):
        kept = (tk.values.float() / 2.0 - tk.log_partition[:, None]).exp()
        reference = (teacher / 2.0).softmax(dim=1).gather(1, tk.ids)
        torch.testing.assert_close(kept, reference, rtol=rtol, atol=1e-6)
    # bf16 logits (autocast): values keep their dtype, the log-partition is float32.
    low = TopKTeacher.from_logits(teacher.bfloat16(), 4, temperature=2.0)
    assert low.values.dtype == torch.bfloat16 and low.log_partition.dtype == torch.float32


# ---------------------------------------------------------------- low precision

@pytest.mark.parametrize("device", DEVICES)
def test_all_losses_have_finite_gradients_under_bf16_autocast(device):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 10).to(device)
    x = (torch.randn(8, 16) * 4).to(device)
    labels = torch.randint(0, 10, (8,)).to(device)
    teacher = (torch.randn(8, 10) * 5).to(device)
    losses = {
        "ce": lambda z: cross_entropy(z, labels),
        "tsd": lambda z: tsd_loss(z, labels, eta_from_u(0.6, K), K),
        "lsr": lambda z: lsr_loss(z, labels, 0.4),
        "cp": lambda z: cp_loss(z, labels, 0.4),
        "kd_full": lambda z: student_loss(z, labels, teacher.half(), 0.6, 2.0),
        "kd_topk": lambda z: student_loss(
            z, labels, _half(TopKTeacher.from_logits(teacher, 4, 2.0)), 0.6, 2.0),
        "kd_topk_all": lambda z: student_loss(
            z, labels, _half(TopKTeacher.from_logits(teacher, 10)), 0.6),
    }
    for name, fn in losses.items():
        model.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            z = model(x)
            assert z.dtype == torch.bfloat16
            loss, parts = fn(z)
        assert loss.dtype == torch.float32, name
        assert all(torch.isfinite(v) for v in parts.values()), name
        loss.backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in model.parameters()), name
        # float32 arithmetic: same value as the loss of the bf16 logits cast up front
        assert loss.item() == pytest.approx(fn(z.detach().float())[0].item(), rel=1e-6), name
