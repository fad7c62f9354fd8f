"""Losses of the tolerant-teacher method (METHOD.md): CE, TSD, LSR, CP and the student mixture.

Every loss is a pure function `(logits, labels, ...) -> (loss, parts)`: `loss` is a scalar
(mean over the batch) and `parts` holds each component as a detached scalar, for logging.
All arithmetic is float32 whatever the logits' dtype, so the losses are safe under bf16 or
fp16 autocast (none of the ops used here is on autocast's lower-precision list).

The student's teacher is either full logits (B, C) or a `TopKTeacher` (fasttt/teachers.py),
what both teachers answer: the k largest teacher logits, their class ids and the
log-partition, from which the kept probabilities are exact and the rest is one tail bucket.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttt.teachers import TopKTeacher

Parts = dict[str, Tensor]


# ---------------------------------------------------------------- u <-> eta

def eta_from_u(u: float, k: int) -> float:
    """The TSD weight eta whose optimal top-1 confidence is u: a / (1 + a), a = u K / (K - 1)."""
    _check_k(k)
    if not 0 <= u <= 1:
        raise ValueError(f"u must be in [0, 1], got {u}")
    if u == 1:
        # u(eta) saturates at 1 for every eta >= K / (2K - 1); u = 1 is defined as plain CE.
        return 1.0
    a = u * k / (k - 1)
    return a / (1 + a)


def u_from_eta(eta: float, k: int) -> float:
    """The optimal top-1 confidence of TSD with weight eta: min(eta / (1 - eta) (K-1) / K, 1)."""
    _check_k(k)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta == 1:
        return 1.0
    return min(eta / (1 - eta) * (k - 1) / k, 1.0)


def _check_k(k: int) -> None:
    if k < 2:
        raise ValueError(f"K must be >= 2 (the TSD term averages K - 1 scores), got {k}")


# ---------------------------------------------------------------- patriarch losses

def cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Parts]:
    """Mean -log p[y] (Eqn 1)."""
    ce = F.cross_entropy(logits.float(), labels)
    return ce, {"ce": ce.detach()}


def tsd_loss(logits: Tensor, labels: Tensor, eta: float, k: int) -> tuple[Tensor, Parts]:
    """Top score difference, Eqn 3: eta CE + (1 - eta) (p_(1) - mean of p_(2..K))."""
    _check_k(k)
    if k > logits.shape[1]:
        raise ValueError(f"K = {k} exceeds the number of classes {logits.shape[1]}")
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    # The scores are the prediction's own K largest; topk's values carry the gradient.
    top = logits.softmax(dim=1).topk(k, dim=1).values
    term = (top[:, 0] - top[:, 1:].sum(dim=1) / (k - 1)).mean()
    return _mix(eta, ce, term), {"ce": ce.detach(), "tsd": term.detach()}


def lsr_loss(logits: Tensor, labels: Tensor, eta: float) -> tuple[Tensor, Parts]:
    """Label-smoothing patriarch: eta CE + (1 - eta) KL(uniform || p)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    num_classes = logits.shape[1]
    # KL(u || p) = sum_c (1/C) (log(1/C) - log p_c) = -log C - mean_c log p_c
    term = (-math.log(num_classes) - logits.log_softmax(dim=1).mean(dim=1)).mean()
    return _mix(eta, ce, term), {"ce": ce.detach(), "lsr": term.detach()}


def cp_loss(logits: Tensor, labels: Tensor, eta: float) -> tuple[Tensor, Parts]:
    """Confidence-penalty patriarch: eta CE + (1 - eta) (-H(p))."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    log_p = logits.log_softmax(dim=1)
    term = (log_p.exp() * log_p).sum(dim=1).mean()  # sum p log p = -H(p)
    return _mix(eta, ce, term), {"ce": ce.detach(), "cp": term.detach()}


def _mix(weight: float, ce: Tensor, term: Tensor) -> Tensor:
    if not 0 <= weight <= 1:
        raise ValueError(f"the CE weight must be in [0, 1], got {weight}")
    if weight == 1:
        return ce  # exactly CE, and a non-finite term cannot leak in as 0 * inf
    return weight * ce + (1 - weight) * term


# ---------------------------------------------------------------- student loss

def student_loss(logits: Tensor, labels: Tensor, teacher: Tensor | TopKTeacher, lam: float,
                 temperature: float = 1.0) -> tuple[Tensor, Parts]:
    """Eqn 2: lam CE + (1 - lam) T^2 KL(p_T || p_S), softmaxes at T; parts["kl"] is unscaled."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    if isinstance(teacher, TopKTeacher) and teacher.ids.shape[1] == logits.shape[1]:
        # k = C holds the full logits: the same arithmetic as an online teacher, so a
        # cached student follows the online one's trajectory exactly.
        full = torch.empty_like(logits).scatter_(1, teacher.ids.long(), teacher.values.float())
        kl = _full_kl(logits, full, temperature)
    elif isinstance(teacher, TopKTeacher):
        kl = _topk_kl(logits, teacher, temperature)
    else:
        kl = _full_kl(logits, teacher, temperature)
    loss = _mix(lam, ce, temperature**2 * kl)
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def _full_kl(logits: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    if teacher.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} must match the student's "
                         f"{tuple(logits.shape)}")
    log_q = (teacher.detach().float() / temperature).log_softmax(dim=1)
    log_s = (logits / temperature).log_softmax(dim=1)
    return _kl_terms(log_q.exp(), log_s).sum(dim=1).mean()


def _topk_kl(logits: Tensor, teacher: TopKTeacher, temperature: float) -> Tensor:
    """KL of the coarsened distributions: the k kept classes plus one tail bucket."""
    if teacher.temperature != temperature:
        # log_partition is only valid at the T it was computed for.
        raise ValueError(f"the top-k teacher was built at temperature {teacher.temperature}, "
                         f"the student uses {temperature}")
    batch, num_classes = logits.shape
    if teacher.values.shape[0] != batch or teacher.values.shape[1] > num_classes:
        raise ValueError(f"top-k teacher {tuple(teacher.values.shape)} does not fit student "
                         f"logits {tuple(logits.shape)}")
    ids = teacher.ids.long()
    z = logits / temperature
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    log_s_kept = z.gather(1, ids) - log_norm
    q_kept = (teacher.values.float() / temperature
              - teacher.log_partition.float()[:, None]).exp()
    kl = _kl_terms(q_kept, log_s_kept).sum(dim=1)
    if ids.shape[1] < num_classes:
        # fp16 values can round the kept mass a hair above 1: the tail is clamped at 0.
        q_tail = (1 - q_kept.sum(dim=1)).clamp(min=0)
        # logsumexp over the other classes is exact even where the student's tail is far
        # below float32's resolution of 1 - sum(kept), where log1p(-sum) would give -inf.
        kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
        log_s_tail = torch.logsumexp(z.masked_fill(kept, -math.inf), dim=1) - log_norm[:, 0]
        kl = kl + _kl_terms(q_tail, log_s_tail)
    # k = C: the tail is empty; fp16 rounding of the teacher's mass there is not a class.
    return kl.mean()


def _kl_terms(q: Tensor, log_s: Tensor) -> Tensor:
    # q log q - q log s with 0 log 0 = 0, so zero teacher mass never gives NaN.
    return torch.xlogy(q, q) - q * log_s


# ---------------------------------------------------------------- objectives of a run

def patriarch_ce_weight(u: float, k: int, eta: float = 0.0) -> float:
    """The patriarch's CE weight: `eta` when given (> 0), else derived from u by TSD's optimum."""
    return eta or eta_from_u(u, k)


def patriarch_loss_name(kind: str, u: float, k: int, eta: float = 0.0) -> str:
    """The loss the patriarch really trains with: any loss whose CE weight is 1 is plain "ce"."""
    return "ce" if kind == "ce" or patriarch_ce_weight(u, k, eta) == 1 else kind


def patriarch_objective(kind: str, u: float, k: int, eta: float = 0.0):
    """The patriarch's (logits, labels, teacher=None) -> (loss, parts), from the recipe."""
    eta = patriarch_ce_weight(u, k, eta)
    if patriarch_loss_name(kind, u, k, eta) == "ce":
        return lambda logits, labels, _: cross_entropy(logits, labels)
    if kind == "tsd":
        return lambda logits, labels, _: tsd_loss(logits, labels, eta, k)
    if kind == "lsr":
        return lambda logits, labels, _: lsr_loss(logits, labels, eta)
    if kind == "cp":
        return lambda logits, labels, _: cp_loss(logits, labels, eta)
    raise ValueError(f"unknown patriarch loss {kind!r}")


def student_objective(lam: float, temperature: float):
    """A student's (logits, labels, teacher output) -> (loss, parts): Eqn 2 at temperature T."""
    return lambda logits, labels, teacher: student_loss(logits, labels, teacher, lam,
                                                        temperature)
