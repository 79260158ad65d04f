"""Distillation losses: pure functions over documented shapes that return SUMS and token counts.

Nothing here divides by a token count. The trainer normalises once per optimizer step, by the
global count of target tokens of the whole step (all micro-batches, all ranks), which is what makes
gradient accumulation and data parallelism exact.

Shapes: B batch, L sequence length, N = B*L flattened positions, V vocabulary,
M counted positions (target != IGNORE_INDEX), C rows of one chunk.

For one position with student logits z (V,), target y and teacher logits t (V,), at temperature T:

    loss  = alpha * CE(z, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(z/T))
    dloss/dz = alpha * (softmax(z) - onehot(y)) + (1 - alpha) * T * (softmax(z/T) - softmax(t/T))

The forward pass walks the counted positions in chunks, computes both terms and that gradient in
fp32, and stores the gradient in the student logits' dtype; backward only scales it. So each teacher
chunk is formed exactly once (the factored codec pays a matmul per chunk), and the extra memory is
O(C*V) fp32 plus one (N, V) gradient in the student dtype: never a full (N, V) fp32 tensor.
A -inf teacher logit is a zero-probability entry (dense-u8's dropped tail): 0 * log 0 = 0.

Sparse targets (`sampled`, `topk` stores): the teacher function returns `SparseTargets` instead of (C, V)
logits: K ids per position with teacher probabilities w_k at T, optionally a "rest" bucket of mass m that is
matched to the student's own mass outside the ids, q_rest = 1 - sum_k q_k. Then

    KL  = const - sum_k w_k log q_T(id_k) - m log q_rest        (const = sum p log p, stored by the codec)
    dKL/d(z/T) = (sum_k w_k + m) q_T - scatter(w) - m * q_T * [v not in ids] / q_rest

gathered from the student's log-probs in the same chunk pass (at T = 1 the CE term's log_softmax is reused),
so no (N, V) or (C, V) teacher tensor is ever formed. With K draws from p_T stored as unique ids and counts,
w = counts / draws and E[w] = p_T: the gradient is unbiased for the dense one (tests/test_losses.py).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
"""Target value of positions excluded from every term and from the token count."""



@dataclass
class SparseTargets:
    """Sparse teacher targets of C positions at the training temperature (K ids each).

    ids_CK: int64 token ids; padding slots hold any valid id with probability 0.
    probs_CK: float32 teacher probabilities at T of those ids (an unbiased estimate for a sampled store).
    rest_C: float32 teacher mass outside the ids, matched by one bucket to the student's mass outside them;
    None when the ids carry all the mass (sampled).
    neg_entropy_C: float32 sum p log p of the teacher at T (the KL's constant; gradients do not depend on it).
    """

    ids_CK: torch.Tensor
    probs_CK: torch.Tensor
    rest_C: torch.Tensor | None
    neg_entropy_C: torch.Tensor

    def __len__(self) -> int:
        return self.ids_CK.shape[0]

    def select(self, rows: torch.Tensor) -> SparseTargets:
        pick = lambda t: None if t is None else t.index_select(0, rows)  # noqa: E731
        return SparseTargets(pick(self.ids_CK), pick(self.probs_CK), pick(self.rest_C), pick(self.neg_entropy_C))

    def within_vocab(self, vocab_size: int) -> SparseTargets:
        """Ids at or beyond `vocab_size` (a teacher's padded vocabulary) leave the target (probability 0)."""
        out = self.ids_CK >= vocab_size
        if not out.any():
            return self
        return SparseTargets(self.ids_CK.masked_fill(out, 0), self.probs_CK.masked_fill(out, 0.0), self.rest_C,
                             self.neg_entropy_C)

    def to(self, device) -> SparseTargets:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SparseTargets(move(self.ids_CK), move(self.probs_CK), move(self.rest_C), move(self.neg_entropy_C))


TeacherLogitsFn = Callable[[int, int], "torch.Tensor | SparseTargets"]
"""(start, end) -> float32 (end - start, V): teacher logits, up to an additive constant per row, of the
flattened positions [start, end), on the student's device. May contain -inf (zero probability).
Or SparseTargets of those positions (already at the training temperature)."""


@dataclass
class LossSums:
    """Sums over the counted positions of one micro-batch; divide by the global count, once."""

    loss: torch.Tensor
    """Scalar fp32, differentiable: alpha*ce + (1-alpha)*T^2*kl."""
    ce: torch.Tensor
    """Scalar fp32, detached: cross-entropy sum (at T=1)."""
    kl: torch.Tensor
    """Scalar fp32, detached: KL(teacher_T || student_T) sum, without the T^2 factor; 0 when alpha == 1."""
    num_tokens: int
    """Counted positions (target != IGNORE_INDEX)."""


def shift_for_next_token(
    input_ids_BL: torch.Tensor, attention_mask_BL: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token targets (B, L) int64: targets[:, t] = ids[:, t+1].

    The last position has no next token; with a mask, a position is ignored when either it or its
    target is padding (covers left and right padding). Ignored positions hold IGNORE_INDEX.
    """
    targets_BL = torch.full_like(input_ids_BL, IGNORE_INDEX, dtype=torch.long)
    targets_BL[:, :-1] = input_ids_BL[:, 1:]
    if attention_mask_BL is not None:
        keep_BL = torch.zeros_like(targets_BL, dtype=torch.bool)
        keep_BL[:, :-1] = attention_mask_BL[:, :-1].bool() & attention_mask_BL[:, 1:].bool()
        targets_BL.masked_fill_(~keep_BL, IGNORE_INDEX)
    return targets_BL


def count_targets(targets: torch.Tensor) -> int:
    """Number of positions that count (target != IGNORE_INDEX), any shape."""
    return int((targets != IGNORE_INDEX).sum())


CPU_CHUNK_BYTES = 24 << 20
GPU_CHUNK_BYTES = 256 << 20


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Positions per loss chunk when `train.loss_chunk_size` is null: one (chunk, V) fp32 block per
    temporary of at most 24 MiB on CPU, 256 MiB on GPU (the loss holds about five such blocks at its peak).

    On CPU, glibc serves a block above its mmap threshold (at most 32 MiB) with fresh pages that the kernel
    faults in and zeroes on first touch, and unmaps it again on free: every temporary of the loss paid that
    each step. Within 24 MiB the heap reuses it; on the 2-core machine this took a KD step (4 x 256 tokens,
    V = 49,152) from ~8.5 s at 1024 positions to ~5.3 s at 128, with CE-only at ~4.6 s
    (benchmarks/train_step.py --chunk-sizes). On GPU the caching allocator reuses blocks and larger chunks
    use the device better: 1,365 positions for V = 49,152, 256 for a 256k vocabulary.
    """
    budget = CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else GPU_CHUNK_BYTES
    return max(1, budget // (4 * vocab_size))


def check_hparams(alpha: float, temperature: float) -> None:
    """Raise ValueError naming the params key when alpha or temperature is out of range."""
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"train.alpha must be in [0, 1], got {alpha}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"train.temperature must be > 0 (and finite), got {temperature}")


def ce_sum(
    student_logits_NV: torch.Tensor, targets_N: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """(differentiable scalar fp32 CE sum over counted positions, number of counted positions)."""
    sums = _weighted_sums(student_logits_NV, targets_N, None, 1.0, 0.0, 1.0, chunk_size)
    return sums.loss, sums.num_tokens


def kl_sum(
    student_logits_NV: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn,
    targets_N: torch.Tensor,
    temperature: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Differentiable scalar fp32 sum of KL(softmax(t/T) || softmax(z/T)) over counted positions."""
    check_hparams(0.0, temperature)
    return _weighted_sums(
        student_logits_NV, targets_N, teacher_logits_fn, 0.0, 1.0, temperature, chunk_size
    ).loss


def hybrid_loss(
    student_logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn | None,
    *,
    alpha: float,
    temperature: float,
    chunk_size: int | None = None,
) -> LossSums:
    """alpha*CE + (1-alpha)*T^2*KL summed over counted positions (see the module docstring).

    student_logits_NV: (N, V) any float dtype; targets_N: (N,) int, IGNORE_INDEX where excluded.
    teacher_logits_fn is never called when alpha == 1 (plain LM training) and may then be None.
    """
    check_hparams(alpha, temperature)
    if alpha < 1 and teacher_logits_fn is None:
        raise ValueError(f"hybrid_loss needs teacher_logits_fn when train.alpha < 1, got alpha={alpha}")
    kl_weight = (1.0 - alpha) * temperature**2
    return _weighted_sums(
        student_logits_NV, targets_N, teacher_logits_fn, alpha, kl_weight, temperature, chunk_size
    )


def _weighted_sums(
    student_logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn | None,
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    chunk_size: int | None,
) -> LossSums:
    """LossSums with loss = ce_weight * CE + kl_weight * KL; the teacher is read only if kl_weight."""
    assert student_logits_NV.dim() == 2, f"student logits must be (N, V), got {tuple(student_logits_NV.shape)}"
    assert targets_N.shape == student_logits_NV.shape[:1], (
        f"targets {tuple(targets_N.shape)} do not match logits {tuple(student_logits_NV.shape)}"
    )
    if chunk_size is None:  # auto: train.loss_chunk_size null
        chunk_size = default_chunk_size(student_logits_NV.shape[1], student_logits_NV.device)
    assert chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}"
    assert kl_weight == 0 or teacher_logits_fn is not None, "the KL term needs teacher_logits_fn"
    chunks = _plan_chunks(targets_N, chunk_size)
    # Under no_grad (eval) skip the (N, V) gradient buffer; needs_input_grad ignores grad mode.
    build_grad = torch.is_grad_enabled() and student_logits_NV.requires_grad
    loss, ce, kl = _HybridSums.apply(
        student_logits_NV, targets_N, teacher_logits_fn if kl_weight else None,
        ce_weight, kl_weight, temperature, chunks, build_grad,
    )
    return LossSums(loss=loss, ce=ce, kl=kl, num_tokens=sum(len(rows) for _, _, rows in chunks))


def _plan_chunks(targets_N: torch.Tensor, chunk_size: int) -> list[tuple[int, int, torch.Tensor]]:
    """Split the counted positions into chunks: (start, end, rows_C) with end - start <= chunk_size.

    Each chunk starts at a counted position and ends after its last counted one, so runs of ignored
    positions (padding) between chunks are never handed to the teacher; rows_C (on the targets'
    device) are the counted positions inside [start, end).
    """
    rows_M = (targets_N != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    positions = rows_M.tolist()  # one device sync, for the chunk bounds
    chunks, i = [], 0
    while i < len(positions):
        start = positions[i]
        j = bisect.bisect_left(positions, start + chunk_size, lo=i)
        chunks.append((start, positions[j - 1] + 1, rows_M[i:j]))
        i = j
    return chunks


class _HybridSums(torch.autograd.Function):
    """(loss, ce, kl) sums; the gradient w.r.t. the student logits is computed in forward."""

    @staticmethod
    def forward(ctx, student_logits_NV, targets_N, teacher_logits_fn, ce_weight, kl_weight,
                temperature, chunks, build_grad):
        V = student_logits_NV.shape[1]
        fp32 = dict(dtype=torch.float32, device=student_logits_NV.device)
        ce, kl = torch.zeros((), **fp32), torch.zeros((), **fp32)
        grad_NV = torch.zeros_like(student_logits_NV) if build_grad else None
        for start, end, rows_C in chunks:
            z_CV = student_logits_NV.index_select(0, rows_C).float()
            y_C1 = targets_N.index_select(0, rows_C).unsqueeze(1).long()
            logp_CV = z_CV.log_softmax(-1)  # student at T=1
            ce += -logp_CV.gather(1, y_C1).sum()
            t = teacher_logits_fn(start, end) if teacher_logits_fn is not None else None
            if isinstance(t, SparseTargets):
                kl_C, g_CV = _sparse_chunk(z_CV, logp_CV, y_C1, t, start, end, rows_C, ce_weight,
                                           kl_weight, temperature, build_grad)
                kl += kl_C
                if build_grad:
                    grad_NV.index_copy_(0, rows_C, g_CV.to(grad_NV.dtype))
                del logp_CV, g_CV
                continue
            if build_grad:
                g_CV = logp_CV.exp_().scatter_add_(1, y_C1, torch.full_like(y_C1, -1, dtype=torch.float32))
                g_CV.mul_(ce_weight)  # ce_weight * (softmax(z) - onehot(y)); logp_CV is now consumed
            del logp_CV
            if teacher_logits_fn is not None:
                t_CV = t
                assert t_CV.shape == (end - start, V), (
                    f"teacher logits for [{start}, {end}) are {tuple(t_CV.shape)}, expected {(end - start, V)}"
                )
                if len(rows_C) < end - start:
                    t_CV = t_CV.index_select(0, rows_C - start)
                log_p_CV = (t_CV.float() / temperature).log_softmax(-1)
                del t_CV
                p_CV = log_p_CV.exp()
                log_q_CV = (z_CV / temperature).log_softmax(-1)
                # 0 * log 0 = 0: a -inf teacher logit (zero probability) must not give -inf - x = NaN.
                term_CV = (log_p_CV - log_q_CV).masked_fill_(p_CV == 0, 0.0).mul_(p_CV)
                kl += term_CV.sum()
                del term_CV, log_p_CV
                if build_grad:  # d(kl_weight * KL)/dz = kl_weight / T * (q_T - p_T)
                    g_CV.add_(log_q_CV.exp_().sub_(p_CV), alpha=kl_weight / temperature)
                del p_CV, log_q_CV
            if build_grad:
                grad_NV.index_copy_(0, rows_C, g_CV.to(grad_NV.dtype))
                del g_CV
        ctx.grad_NV = grad_NV
        loss = ce_weight * ce + kl_weight * kl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        grad_NV = ctx.grad_NV
        # Scaling in place keeps one (N, V) buffer instead of two; it can therefore be used once.
        assert grad_NV is not None, "hybrid loss backward ran twice (retain_graph is not supported)"
        ctx.grad_NV = None
        return grad_NV.mul_(grad_loss), None, None, None, None, None, None, None


def _sparse_chunk(z_CV, logp_CV, y_C1, t: SparseTargets, start, end, rows_C, ce_weight, kl_weight,
                  temperature, build_grad) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(KL sum of the chunk, its gradient of ce_weight*CE + kl_weight*KL w.r.t. z (C, V) or None).

    logp_CV: the student's log_softmax at T=1 (the CE term's); consumed (it becomes the gradient). The student
    at T comes from it: e = exp(logp / T) = q_T * s per row (s = sum e), so no second log_softmax is needed,
    and at T = 1 e is the CE term's softmax itself."""
    assert len(t) == end - start, f"sparse targets for [{start}, {end}) hold {len(t)} positions"
    if len(rows_C) < end - start:
        t = t.select(rows_C - start)
    same_t = temperature == 1.0
    ids_CK, w_CK = t.ids_CK.long(), t.probs_CK.float()
    e_CV = logp_CV.exp() if same_t else logp_CV.mul(1.0 / temperature).exp_()
    s_C1 = e_CV.sum(-1, keepdim=True)
    log_q_CK = logp_CV.gather(1, ids_CK).div_(temperature).sub_(s_C1.log())  # log q_T at the ids
    kl_C = t.neg_entropy_C.float() - (w_CK * log_q_CK).sum(-1)
    mass_C1 = w_CK.sum(-1, keepdim=True)
    if t.rest_C is not None:
        m_C1 = t.rest_C.float().unsqueeze(1)
        rest_C1 = e_CV.scatter(1, ids_CK, 0.0).sum(-1, keepdim=True)  # the student's mass outside the ids, * s
        # 0 * log 0 = 0: no teacher mass in the bucket costs nothing, whatever the student puts there.
        kl_C = kl_C - (m_C1 * (rest_C1.log() - s_C1.log())).masked_fill_(m_C1 == 0, 0.0).squeeze(1)
        mass_C1 = mass_C1 + m_C1
    kl = kl_C.sum()
    if not build_grad:
        return kl, None
    scale = kl_weight / temperature  # d(kl_weight * KL)/dz = kl_weight / T * dKL/d(z/T)
    # dKL/d(z/T) = mass * q_T - w at the ids - m * q_T / q_rest outside them  (q_T = e / s, q_rest = rest / s)
    coef_C1 = mass_C1 * scale / s_C1
    at_ids_CK = w_CK * -scale
    if t.rest_C is not None:
        bucket_C1 = torch.where(rest_C1 > 0, m_C1 * scale / rest_C1, 0.0)
        coef_C1 = coef_C1 - bucket_C1
        at_ids_CK = at_ids_CK + bucket_C1 * e_CV.gather(1, ids_CK)  # the ids are not in the bucket
    if same_t:  # ce_weight * softmax(z) + coef * e, with e = softmax(z)
        g_CV = e_CV.mul_(coef_C1 + ce_weight)
        del logp_CV
    else:
        g_CV = e_CV.mul_(coef_C1).add_(logp_CV.exp_(), alpha=ce_weight)
    g_CV.scatter_add_(1, y_C1, torch.full_like(y_C1, -ce_weight, dtype=torch.float32))
    g_CV.scatter_add_(1, ids_CK, at_ids_CK)
    return kl, g_CV
