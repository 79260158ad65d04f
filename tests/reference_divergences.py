"""Naive float64 references for every divergence, written from the definitions and nothing else: per-position
loops, math.exp/math.log on the teacher side, torch float64 scalars on the student side so that autograd gives
the gradient w.r.t. the student's logits. Shared by the loss tests (and by the fused head path's tests).

Shapes: N positions, V vocabulary, K sparse ids per position.

Definitions, per position, p the teacher and q the student at temperature T (q = softmax(z / T)), over a set of
outcomes o (the V tokens of a dense teacher; the K ids plus one "rest" bucket of a sparse one):

    forward_kl  sum_o p_o (log p_o - log q_o)                           (0 log 0 = 0)
    reverse_kl  sum_o q_o (log q_o - log p_o)                           (+inf where p_o = 0 < q_o)
    jsd(beta)   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q;
                beta = 0 is forward_kl and beta = 1 reverse_kl exactly (TRL's and Liger's special cases)
    tvd         0.5 sum_o |p_o - q_o|

    loss = alpha * CE(z, y) + (1 - alpha) * T^2 * D      (CE at T = 1, summed over counted positions)
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
NEG_INF = float("-inf")


def log_softmax_row(z: list[torch.Tensor], T: float) -> list[torch.Tensor]:
    """log softmax(z / T) of one row of float64 scalars, by an explicit max-shifted logsumexp."""
    a = [x / T for x in z]
    m = max(float(x.detach()) for x in a)  # a constant shift: changes neither the value nor the gradient
    total = a[0] * 0
    for x in a:
        total = total + torch.exp(x - m)
    lse = m + torch.log(total)
    return [x - lse for x in a]


def teacher_log_probs_row(t: list[float], T: float) -> list[float]:
    """log softmax(t / T) of one teacher row in plain floats; -inf entries stay -inf (probability zero)."""
    m = max(t)
    lse = m / T + math.log(sum(math.exp((x - m) / T) for x in t))
    return [x / T - lse if x != NEG_INF else NEG_INF for x in t]


def _logaddexp(a, b):
    """log(e^a + e^b) for a float64 scalar tensor and a float (either may be -inf)."""
    return torch.logaddexp(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))


def divergence_over_outcomes(log_p: list[float], log_q: list[torch.Tensor], divergence: str,
                             beta: float = 0.5) -> torch.Tensor:
    """D(p || q) over one position's outcomes; teacher log-probs as floats, student's as float64 scalars."""
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    total = log_q[0] * 0
    for lp, lq in zip(log_p, log_q):
        p, q = math.exp(lp), torch.exp(lq)
        if divergence == "forward_kl":
            if lp != NEG_INF:
                total = total + p * (lp - lq)
        elif divergence == "reverse_kl":
            total = total + (q * (lq - lp) if lp != NEG_INF else torch.full_like(lq, math.inf))
        elif divergence == "jsd":
            lm = _logaddexp(lq + math.log(1 - beta), lp + math.log(beta))
            if lp != NEG_INF:
                total = total + beta * p * (lp - lm)
            total = total + (1 - beta) * q * (lq - lm)
        elif divergence == "tvd":
            total = total + 0.5 * torch.abs(p - q)
        else:
            raise AssertionError(divergence)
    return total


def _reference(z_NV: torch.Tensor, targets_N: torch.Tensor, divergence_of_row, alpha: float, T: float,
               grad_scale: float):
    """(loss, ce, div, d(grad_scale * loss)/dz): CE at T=1 plus, per counted position n,
    divergence_of_row(n, log q_T of the row as float64 scalars) (None: no teacher)."""
    z64 = z_NV.detach().double().requires_grad_(True)
    N, V = z_NV.shape
    ce = div = z64.new_zeros(())
    for n in range(N):
        y = int(targets_N[n])
        if y == IGNORE_INDEX:
            continue
        z = [z64[n, v] for v in range(V)]
        ce = ce - log_softmax_row(z, 1.0)[y]
        d = divergence_of_row(n, log_softmax_row(z, T))
        if d is not None:
            div = div + d
    loss = alpha * ce + (1 - alpha) * T * T * div
    if torch.isfinite(loss):
        (loss * grad_scale).backward()
    return loss.detach(), ce.detach(), div.detach(), z64.grad


def dense_reference(z_NV: torch.Tensor, targets_N: torch.Tensor, teacher_NV: torch.Tensor | None, *, alpha: float,
                    T: float, divergence: str = "forward_kl", beta: float = 0.5, grad_scale: float = 1.0):
    """(loss, ce, div, d(grad_scale * loss)/dz) over the counted positions, from dense teacher logits."""
    teacher = None if teacher_NV is None else teacher_NV.double().tolist()

    def row(n, log_q):
        if teacher is None:
            return None
        return divergence_over_outcomes(teacher_log_probs_row(teacher[n], T), log_q, divergence, beta)

    return _reference(z_NV, targets_N, row, alpha, T, grad_scale)


def sparse_reference(z_NV: torch.Tensor, targets_N: torch.Tensor, ids_NK: list[list[int]],
                     log_p_NK: list[list[float]], log_rest_N: list[float] | None, neg_entropy_N: list[float], *,
                     alpha: float, T: float, divergence: str = "forward_kl", beta: float = 0.5,
                     grad_scale: float = 1.0):
    """(loss, ce, div, gradient) from sparse targets: the ids with teacher log-probabilities > -inf are outcomes
    of their own; with `log_rest_N`, every other token forms one bucket of teacher log-mass log_rest (a slot of
    probability zero, padding, is no outcome: its token belongs to the bucket). Without a bucket (sampled) only
    forward KL is defined: neg_entropy - sum_k w_k log q(id_k), neg_entropy being the teacher's sum p log p."""
    V = z_NV.shape[1]

    def row(n, log_q):
        own = [(i, lp) for i, lp in zip(ids_NK[n], log_p_NK[n]) if lp != NEG_INF]
        if log_rest_N is None:
            assert divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0), divergence
            d = log_q[0].new_tensor(neg_entropy_N[n])
            for i, lp in own:
                d = d - math.exp(lp) * log_q[i]
            return d
        in_ids = {i for i, _ in own}
        bucket = [log_q[v] for v in range(V) if v not in in_ids]
        outcomes_p = [lp for _, lp in own]
        outcomes_q = [log_q[i] for i, _ in own]
        if bucket:  # log of the bucket's mass, max-shifted
            m = max(float(x.detach()) for x in bucket)
            total = bucket[0] * 0
            for x in bucket:
                total = total + torch.exp(x - m)
            outcomes_p.append(log_rest_N[n])
            outcomes_q.append(m + torch.log(total))
        return divergence_over_outcomes(outcomes_p, outcomes_q, divergence, beta)

    return _reference(z_NV, targets_N, row, alpha, T, grad_scale)
