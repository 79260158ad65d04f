"""Distillation losses: pure functions over documented shapes that return SUMS and token counts.

Nothing here divides by a token count. The trainer normalises once per optimizer step, by the
global count of target tokens of the whole step (all micro-batches, all ranks), which is what makes
gradient accumulation and data parallelism exact.

Shapes: B batch, L sequence length, N = B*L flattened positions, V vocabulary,
M counted positions (target != IGNORE_INDEX), C rows of one chunk.

For one position with student logits z (V,), target y and teacher logits t (V,), at temperature T:

    loss  = alpha * CE(z, y) + (1 - alpha) * T^2 * D(softmax(t/T), softmax(z/T))     (D: train.divergence)

The student's logits are never formed whole: `model_loss` runs the student's forward up to its last hidden
states h (N, d) and hands them, with its output head (weight (P, d), bias; student_head.py), to `head_loss`,
which walks the counted positions in chunks of C rows. Per chunk it forms z = head(h_C) in fp32, computes CE,
the divergence and dloss/dz (divergences.chunk_terms), and folds that gradient straight into fp32 gradients
w.r.t. h (N, d) and the head's weight (P, d) and bias, the chain rule of the head applied in the chunk:

    dloss/dh_C = g_C W,   dloss/dW += g_C^T h_C,   dloss/db += sum_c g_c     (g: dloss/d(h W^T + b))

Backward only scales these. So each teacher chunk is formed exactly once (the factored codec pays a matmul
per chunk), and the loss holds O(C*V) fp32 temporaries (about five at its peak) plus the (N, d) and (P, d)
gradients: no (N, V) tensor exists, forward or backward, in any dtype (the cost of the head's three matmuls
is unchanged). Where the caller says how it will scale the loss (grad_scale: the trainer's 1 / global token
count), dloss/dW is added, scaled, into the head weight's own .grad instead, so no (P, d) buffer exists
beside it either. A -inf teacher logit is a zero-probability entry (dense-u8's dropped tail): 0 * log 0 = 0.

Sparse targets (`sampled`, `topk` stores): the teacher function returns `SparseTargets` instead of (C, V)
logits; the divergence is then gathered from the student's log-probs in the same chunk pass, so no (N, V) or
(C, V) teacher tensor is ever formed. The per-chunk math of every term is in divergences.py.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from distill_pipe.divergences import SparseTargets, check_divergence, chunk_terms
from distill_pipe.student_head import HeadSpec, head_spec, run_head

IGNORE_INDEX = -100
"""Target value of positions excluded from every term and from the token count."""



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
    """Scalar fp32, detached: the divergence's sum (train.divergence; KL(teacher_T || student_T) by default),
    without the T^2 factor; 0 when alpha == 1."""
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


def model_loss(
    model: torch.nn.Module,
    input_ids_BL: torch.Tensor,
    targets_BL: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn | None,
    *,
    vocab_size: int | None,
    alpha: float,
    temperature: float,
    chunk_size: int | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    grad_scale: float | None = None,
) -> LossSums:
    """alpha*CE + (1-alpha)*T^2*D of a causal LM student on one micro-batch (the trainer's and the public API's
    entry point), fused with the student's output head: its (N, V) logits never exist.

    input_ids_BL, targets_BL: (B, L) on the model's device (targets IGNORE_INDEX where excluded);
    vocab_size: the logits compared (the student's head rows and the teacher's are sliced to it; None: all of the
    head's); teacher_logits_fn over the flattened positions [start, end) of this micro-batch (None iff alpha == 1).
    divergence, beta: what takes the KL's place (train.divergence, train.beta; divergences.py).
    grad_scale: the factor the caller's backward applies to the loss (head_loss: the trainer's 1 / global count).
    The loss runs inside the model's forward in place of its output head (student_head.run_head).
    """
    spec = head_spec(model, vocab_size)
    targets_N = targets_BL.flatten()
    return run_head(model, input_ids_BL, lambda hidden_BLd, weight_Pd, bias_P: head_loss(
        hidden_BLd.flatten(0, 1), weight_Pd, bias_P, spec, targets_N, teacher_logits_fn, alpha=alpha,
        temperature=temperature, chunk_size=chunk_size, divergence=divergence, beta=beta, grad_scale=grad_scale))


def head_loss(
    hidden_Nd: torch.Tensor,
    weight_Pd: torch.Tensor,
    bias_P: torch.Tensor | None,
    spec: HeadSpec,
    targets_N: torch.Tensor,
    teacher_logits_fn: TeacherLogitsFn | None,
    *,
    alpha: float,
    temperature: float,
    chunk_size: int | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    grad_scale: float | None = None,
) -> LossSums:
    """The fused loss over last hidden states (N, d) and an output head (weight (P, d), bias (P,) or None, spec:
    what the student applies to its logits and which rows count): differentiable w.r.t. all three.

    teacher_logits_fn is never called when alpha == 1 (plain LM training) and may then be None.

    grad_scale (None: off) is a promise that the loss will be backpropagated exactly once, times grad_scale
    ((loss * grad_scale).backward() or (loss / count).backward() with grad_scale = 1 / count). The head's
    gradient is then added, already scaled, straight into weight_Pd.grad (created when it is None) in the chunk
    loop, instead of into an fp32 (P, d) buffer that backward hands to autograd: with .grad existing
    (accumulation micro-batches 2..k) that buffer is 4 P d bytes on top of the gradients (1 GiB at d = 2,048,
    V = 128,256). Only for an fp32 leaf weight without hooks (other heads take the buffer path) and only where
    nothing reduces gradients from accumulation hooks (DDP does; FSDP2 reads .grad after backward and single-
    process training reads it at the optimizer step: the trainer passes it, and api.DistillLoss.backward in one
    process without DDP). backward raises if the factor it receives is another one (.grad already holds the
    head's part by then). If the forward raises partway (a teacher read failing) or its loss is never
    backpropagated, .grad keeps what the chunks before added: zero the gradients before using them again.
    """
    check_hparams(alpha, temperature)
    check_divergence(divergence, beta)
    if alpha < 1 and teacher_logits_fn is None:
        raise ValueError(f"the loss needs teacher_logits_fn when train.alpha < 1, got alpha={alpha}")
    assert hidden_Nd.dim() == 2 and targets_N.shape == hidden_Nd.shape[:1], (
        f"hidden states {tuple(hidden_Nd.shape)} do not match targets {tuple(targets_N.shape)}")
    kl_weight = (1.0 - alpha) * temperature**2
    if chunk_size is None:  # auto: train.loss_chunk_size null
        chunk_size = default_chunk_size(spec.vocab_size, hidden_Nd.device)
    assert chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}"
    chunks = _plan_chunks(targets_N, chunk_size)
    # Under no_grad (eval) no gradient is formed; needs_input_grad ignores grad mode.
    build_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_Nd, weight_Pd, bias_P))
    sink = build_grad and grad_scale is not None and _grad_sink(weight_Pd)
    loss, ce, kl = _FusedHeadSums.apply(
        hidden_Nd, weight_Pd, bias_P, targets_N, teacher_logits_fn if kl_weight else None, spec,
        alpha, kl_weight, temperature, chunks, build_grad, divergence, beta, grad_scale if sink else None,
    )
    return LossSums(loss=loss, ce=ce, kl=kl, num_tokens=sum(len(rows) for _, _, rows in chunks))


def _grad_sink(weight: torch.Tensor) -> bool:
    """Whether head_loss may add the head's gradient into weight.grad itself (see grad_scale)."""
    grad = weight.grad
    return (weight.is_leaf and weight.requires_grad and weight.dtype == torch.float32 and type(weight) in
            (torch.Tensor, torch.nn.Parameter) and not weight._backward_hooks
            and not getattr(weight, "_post_accumulate_grad_hooks", None)
            and (grad is None or (grad.layout == torch.strided and grad.dtype == torch.float32
                                  and grad.shape == weight.shape and grad.is_contiguous())))


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


class _FusedHeadSums(torch.autograd.Function):
    """(loss, ce, kl) sums over hidden states and an output head; the gradients w.r.t. the hidden states and the
    head's weight and bias are accumulated in fp32 chunk by chunk in forward, and backward only scales them.
    With grad_scale (head_loss) the weight's goes into weight.grad, scaled, and backward returns None for it."""

    @staticmethod
    def forward(ctx, hidden_Nd, weight_Pd, bias_P, targets_N, teacher_logits_fn, spec, ce_weight, kl_weight,
                temperature, chunks, build_grad, divergence, beta, grad_scale):
        need_h, need_w, need_b = (build_grad and ctx.needs_input_grad[i] for i in range(3))
        sink_w = None
        if need_w and grad_scale is not None:  # straight into .grad (no (P, d) buffer)
            if weight_Pd.grad is None:
                weight_Pd.grad = torch.zeros_like(weight_Pd, memory_format=torch.contiguous_format)
            sink_w, need_w = weight_Pd.grad, False
        ctx.grad_scale = grad_scale if sink_w is not None else None
        fp32 = dict(dtype=torch.float32, device=hidden_Nd.device)
        ce, kl = torch.zeros((), **fp32), torch.zeros((), **fp32)
        W_Vd, b_V = spec.prepare(weight_Pd, bias_P)
        V = spec.vocab_size
        grad_h = torch.zeros(hidden_Nd.shape, **fp32) if need_h else None
        grad_w = torch.zeros(weight_Pd.shape, **fp32) if need_w else None  # rows beyond V (padding) stay 0
        grad_b = torch.zeros(bias_P.shape, **fp32) if need_b else None
        with torch.autocast(hidden_Nd.device.type, enabled=False):
            for start, end, rows_C in chunks:
                h_Cd = hidden_Nd.index_select(0, rows_C).float()
                z_CV = spec.logits(h_Cd, W_Vd, b_V)
                y_C = targets_N.index_select(0, rows_C).long()
                t = None if teacher_logits_fn is None else _counted_rows(teacher_logits_fn(start, end), start, end,
                                                                          rows_C, V)
                ce_C, kl_C, g_CV = chunk_terms(z_CV, y_C, t, ce_weight=ce_weight, kd_weight=kl_weight,
                                               temperature=temperature, build_grad=build_grad,
                                               divergence=divergence, beta=beta)
                ce += ce_C
                kl += kl_C
                del t
                if build_grad:
                    g_CV = spec.backprop_(z_CV, g_CV)  # now d loss / d(h W^T + b)
                    if need_h:
                        grad_h.index_copy_(0, rows_C, g_CV @ W_Vd)
                    if need_w:
                        grad_w[:V].addmm_(g_CV.T, h_Cd)
                    elif sink_w is not None:
                        sink_w[:V].addmm_(g_CV.T, h_Cd, alpha=grad_scale)
                    if need_b:
                        grad_b[:V].add_(g_CV.sum(0))
                del z_CV, g_CV, h_Cd
        ctx.grads = [None if g is None else (g, x.dtype)
                     for g, x in ((grad_h, hidden_Nd), (grad_w, weight_Pd), (grad_b, bias_P))]
        loss = ce_weight * ce + kl_weight * kl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_ce, grad_kl):
        grads = ctx.grads
        if ctx.grad_scale is not None and not math.isclose(float(grad_loss), ctx.grad_scale, rel_tol=1e-5):
            raise RuntimeError(f"the loss was built with grad_scale={ctx.grad_scale:.6g} (its head gradient is "
                               f"already in .grad, times that) but backpropagated times {float(grad_loss):.6g}; "
                               "backpropagate loss * grad_scale, or build it with grad_scale=None")
        # Scaled in place and handed over (autograd takes a tensor as .grad when the parameter has none): once.
        assert grads is not None, "the loss's backward ran twice (retain_graph is not supported)"
        ctx.grads = None
        out = [None if g is None else g[0].mul_(grad_loss).to(g[1]) for g in grads]
        del grads
        return (*out, None, None, None, None, None, None, None, None, None, None, None)


def _counted_rows(t, start: int, end: int, rows_C: torch.Tensor, V: int):
    """The teacher's targets of chunk [start, end) restricted to its counted rows rows_C."""
    if isinstance(t, SparseTargets):
        assert len(t) == end - start, f"sparse targets for [{start}, {end}) hold {len(t)} positions"
        return t.select(rows_C - start) if len(rows_C) < end - start else t
    assert t.shape == (end - start, V), (
        f"teacher logits for [{start}, {end}) are {tuple(t.shape)}, expected {(end - start, V)}"
    )
    return t.index_select(0, rows_C - start) if len(rows_C) < end - start else t
