"""The unfused loss over full (N, V) student logits: the project's path before the loss was fused with the
student's head (losses.head_loss), kept only as the reference the tests compare the fused path with, and the
"old" side of benchmarks/student_memory.py.

It forms the per-chunk terms with the same divergences.chunk_terms and chunk plan, and stores the gradient
w.r.t. the logits as one (N, V) tensor in their dtype: the memory the fused path removes.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from distill_pipe.divergences import check_divergence, chunk_terms
from distill_pipe.losses import (LossSums, TeacherLogitsFn, _counted_rows, _plan_chunks, check_hparams,
                                 default_chunk_size)


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
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> LossSums:
    """alpha*CE + (1-alpha)*T^2*KL summed over counted positions (see the module docstring).

    student_logits_NV: (N, V) any float dtype; targets_N: (N,) int, IGNORE_INDEX where excluded.
    teacher_logits_fn is never called when alpha == 1 (plain LM training) and may then be None.
    divergence, beta: what takes the KL's place (train.divergence, train.beta; divergences.py).
    """
    check_hparams(alpha, temperature)
    check_divergence(divergence, beta)
    if alpha < 1 and teacher_logits_fn is None:
        raise ValueError(f"hybrid_loss needs teacher_logits_fn when train.alpha < 1, got alpha={alpha}")
    kl_weight = (1.0 - alpha) * temperature**2
    return _weighted_sums(
        student_logits_NV, targets_N, teacher_logits_fn, alpha, kl_weight, temperature, chunk_size, divergence, beta
    )


def _weighted_sums(
    student_logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn | None,
    ce_weight: float,
    kl_weight: float,
    temperature: float,
    chunk_size: int | None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
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
        ce_weight, kl_weight, temperature, chunks, build_grad, divergence, beta,
    )
    return LossSums(loss=loss, ce=ce, kl=kl, num_tokens=sum(len(rows) for _, _, rows in chunks))


class _HybridSums(torch.autograd.Function):
    """(loss, ce, kl) sums; the gradient w.r.t. the student logits is computed in forward."""

    @staticmethod
    def forward(ctx, student_logits_NV, targets_N, teacher_logits_fn, ce_weight, kl_weight,
                temperature, chunks, build_grad, divergence, beta):
        V = student_logits_NV.shape[1]
        fp32 = dict(dtype=torch.float32, device=student_logits_NV.device)
        ce, kl = torch.zeros((), **fp32), torch.zeros((), **fp32)
        grad_NV = torch.zeros_like(student_logits_NV) if build_grad else None
        for start, end, rows_C in chunks:
            z_CV = student_logits_NV.index_select(0, rows_C).float()
            y_C = targets_N.index_select(0, rows_C).long()
            t = None if teacher_logits_fn is None else _counted_rows(teacher_logits_fn(start, end), start, end,
                                                                      rows_C, V)
            ce_C, kl_C, g_CV = chunk_terms(z_CV, y_C, t, ce_weight=ce_weight, kd_weight=kl_weight,
                                           temperature=temperature, build_grad=build_grad,
                                           divergence=divergence, beta=beta)
            ce += ce_C
            kl += kl_C
            del z_CV, t
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
        return grad_NV.mul_(grad_loss), None, None, None, None, None, None, None, None, None


def model_loss(model, input_ids_BL, targets_BL, teacher_logits_fn, *, vocab_size, alpha, temperature,
               chunk_size=None, divergence="forward_kl", beta=0.5, grad_scale=None) -> LossSums:
    """losses.model_loss as it was: the student's whole (B, L, V) logits from its forward, then hybrid_loss
    (grad_scale, the fused path's promise, is ignored: autograd carries every gradient here)."""
    logits_BLV = model(input_ids=input_ids_BL, use_cache=False).logits
    V = vocab_size or logits_BLV.shape[-1]
    return hybrid_loss(logits_BLV.flatten(0, 1)[:, :V], targets_BL.flatten(), teacher_logits_fn, alpha=alpha,
                       temperature=temperature, chunk_size=chunk_size, divergence=divergence, beta=beta)
