"""Losses against an explicit per-position loop (float64, math.exp softmax), a hand-computed value,
F.cross_entropy, and the properties the trainer relies on (sums, chunk bounds, memory). These run the unfused
reference over (N, V) logits (tests/unfused.py), which shares the chunk plan and the per-chunk terms with the
fused loss; test_fused.py holds the fused path to it.

Shapes: N flattened positions, V vocabulary, C chunk rows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill_pipe.losses import IGNORE_INDEX, count_targets, shift_for_next_token
from unfused import ce_sum, hybrid_loss, kl_sum

NEG_INF = float("-inf")


# ---------------------------------------------------------------- naive reference


def _naive_logsumexp(xs: list[torch.Tensor]) -> torch.Tensor:
    m = max(float(x.detach()) for x in xs)  # a constant shift: does not change the value or the gradient
    total = xs[0] * 0
    for x in xs:
        total = total + torch.exp(x - m)
    return m + torch.log(total)


def naive_sums(z_NV: torch.Tensor, targets: list[int], teacher: list[list[float]] | None,
               alpha: float, T: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) by a loop over positions and vocabulary entries; z_NV float64, may require grad."""
    N, V = z_NV.shape
    ce = z_NV.new_zeros(())
    kl = z_NV.new_zeros(())
    for n in range(N):
        if targets[n] == IGNORE_INDEX:
            continue
        z = [z_NV[n, v] for v in range(V)]
        ce = ce + _naive_logsumexp(z) - z[targets[n]]
        if teacher is None:
            continue
        t = teacher[n]
        m = max(t)
        e = [math.exp((x - m) / T) for x in t]  # math.exp(-inf) == 0.0: a zero-probability entry
        p = [x / sum(e) for x in e]
        lse_q = _naive_logsumexp([x / T for x in z])
        for v in range(V):
            if p[v] > 0:  # 0 * log 0 = 0
                kl = kl + p[v] * (math.log(p[v]) - (z[v] / T - lse_q))
    return alpha * ce + (1 - alpha) * T * T * kl, ce, kl


def naive_with_grad(z_NV, targets_N, teacher_NV, alpha, T, grad_scale=1.0):
    z64 = z_NV.detach().double().requires_grad_(True)
    teacher = None if teacher_NV is None else teacher_NV.double().tolist()
    loss, ce, kl = naive_sums(z64, targets_N.tolist(), teacher, alpha, T)
    (loss * grad_scale).backward()
    return loss.detach(), ce.detach(), kl.detach(), z64.grad


# ---------------------------------------------------------------- fixtures


class CountingTeacher:
    """teacher_logits_fn over a fixed (N, V) tensor that records the ranges it is asked for."""

    def __init__(self, teacher_NV: torch.Tensor):
        self.teacher_NV = teacher_NV
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> torch.Tensor:
        self.calls.append((start, end))
        return self.teacher_NV[start:end].clone()


def make_case(N=13, V=7, seed=0, ignore=(2, 3, 9), num_neg_inf=10):
    g = torch.Generator().manual_seed(seed)
    student_NV = torch.randn(N, V, generator=g) * 2
    teacher_NV = torch.randn(N, V, generator=g) * 3
    targets_N = torch.randint(0, V, (N,), generator=g)
    targets_N[list(ignore)] = IGNORE_INDEX
    # -inf entries (dense-u8's dropped tail), never a whole row: column 0 stays finite
    flat = torch.randperm(N * (V - 1), generator=g)[:num_neg_inf]
    mask = torch.zeros(N * (V - 1), dtype=torch.bool)
    mask[flat] = True
    teacher_NV[:, 1:][mask.view(N, V - 1)] = NEG_INF  # (t[:, 1:].reshape(-1) would be a copy)
    return student_NV, teacher_NV, targets_N


def never_called(start: int, end: int) -> torch.Tensor:
    raise AssertionError(f"teacher asked for [{start}, {end}) although alpha == 1")


# ---------------------------------------------------------------- targets


def test_shift_for_next_token_without_mask():
    ids_BL = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]], dtype=torch.int32)
    expected = torch.tensor([[6, 7, 8, IGNORE_INDEX], [2, 3, 4, IGNORE_INDEX]])
    targets_BL = shift_for_next_token(ids_BL)
    assert targets_BL.dtype == torch.long
    assert torch.equal(targets_BL, expected)
    assert count_targets(targets_BL) == 6


def test_shift_for_next_token_masks_right_and_left_padding():
    ids_BL = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 1, 2, 3]])
    mask_BL = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    I = IGNORE_INDEX
    expected = torch.tensor([[6, 7, I, I, I], [I, I, 2, 3, I]])
    assert torch.equal(shift_for_next_token(ids_BL, mask_BL), expected)
    assert count_targets(expected) == 4


# ---------------------------------------------------------------- against the naive loop


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 100])
def test_ce_sum_matches_naive(chunk_size):
    student_NV, _, targets_N = make_case()
    z_NV = student_NV.clone().requires_grad_(True)
    total, count = ce_sum(z_NV, targets_N, chunk_size=chunk_size)
    (total * 0.25).backward()
    _, ref_ce, _, ref_grad = naive_with_grad(student_NV, targets_N, None, 1.0, 1.0, grad_scale=0.25)
    assert count == 10
    assert total.dtype == torch.float32 and total.dim() == 0
    torch.testing.assert_close(total.double(), ref_ce, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_NV.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("chunk_size", [3, 13])
def test_kl_sum_matches_naive(temperature, chunk_size):
    student_NV, teacher_NV, targets_N = make_case(seed=1)
    z_NV = student_NV.clone().requires_grad_(True)
    total = kl_sum(z_NV, CountingTeacher(teacher_NV), targets_N, temperature, chunk_size=chunk_size)
    total.backward()
    # alpha=0 scales KL by T^2; undo it to compare the bare KL sum and its gradient
    _, _, ref_kl, ref_grad = naive_with_grad(student_NV, targets_N, teacher_NV, 0.0, temperature,
                                             grad_scale=1 / temperature**2)
    assert torch.isfinite(total) and total > 0
    torch.testing.assert_close(total.double(), ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_NV.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_hybrid_matches_naive(alpha, temperature, chunk_size):
    student_NV, teacher_NV, targets_N = make_case(seed=2)
    z_NV = student_NV.clone().requires_grad_(True)
    teacher_fn = CountingTeacher(teacher_NV) if alpha < 1 else never_called
    sums = hybrid_loss(z_NV, targets_N, teacher_fn, alpha=alpha, temperature=temperature,
                       chunk_size=chunk_size)
    (sums.loss / 7).backward()  # the trainer divides by a global count: grad_output != 1
    ref_loss, ref_ce, ref_kl, ref_grad = naive_with_grad(
        student_NV, targets_N, teacher_NV if alpha < 1 else None, alpha, temperature, grad_scale=1 / 7)
    assert sums.num_tokens == 10
    for t in (sums.loss, sums.ce, sums.kl):
        assert t.dtype == torch.float32 and t.dim() == 0
    assert not sums.ce.requires_grad and not sums.kl.requires_grad
    torch.testing.assert_close(sums.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.kl.double(), ref_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_NV.grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(z_NV.grad[targets_N == IGNORE_INDEX] == 0)


def test_bf16_student_gradient_is_bf16_and_close_to_fp64():
    student_NV, teacher_NV, targets_N = make_case(N=40, V=33, seed=3, ignore=(0, 39), num_neg_inf=50)
    z_NV = student_NV.bfloat16().requires_grad_(True)
    sums = hybrid_loss(z_NV, targets_N, CountingTeacher(teacher_NV), alpha=0.4, temperature=2.0,
                       chunk_size=7)
    (sums.loss / 38).backward()
    # the reference sees the same bf16 inputs, upcast: only the gradient's bf16 rounding differs
    ref_loss, _, _, ref_grad = naive_with_grad(z_NV.float(), targets_N, teacher_NV, 0.4, 2.0,
                                               grad_scale=1 / 38)
    assert sums.loss.dtype == torch.float32
    assert z_NV.grad.dtype == torch.bfloat16
    torch.testing.assert_close(sums.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    # two bf16 roundings (the stored gradient, then its scaling): relative error <= ~2 * 2^-8
    torch.testing.assert_close(z_NV.grad.double(), ref_grad, rtol=1e-2, atol=1e-5)


# ---------------------------------------------------------------- hand-computed value


def test_golden_hand_computed_value():
    """Two positions, V=3, alpha=0.5, T=2.

    Position 0: z = [0, 0, 0], y = 1, t = [0, 0, -inf].
      CE = log 3 = 1.0986123.  q_T = [1/3, 1/3, 1/3], p_T = [1/2, 1/2, 0] (0 * log 0 = 0)
      KL = 2 * 1/2 * log((1/2) / (1/3)) = log 1.5 = 0.4054651
      grad = 0.5 * ([1/3, 1/3, 1/3] - [0, 1, 0]) + 0.5 * 2 * ([1/3, 1/3, 1/3] - [1/2, 1/2, 0])
           = [1/6, -1/3, 1/6] + [-1/6, -1/6, 1/3] = [0, -1/2, 1/2]
    Position 1: z = [2 ln 2, 0, 0], y = 0, t = [2 ln 2, 2 ln 2, 0].
      softmax(z) = [4, 1, 1] / 6, CE = -log(4/6) = log 1.5 = 0.4054651
      z/T = [ln 2, 0, 0] -> q_T = [1/2, 1/4, 1/4];  t/T = [ln 2, ln 2, 0] -> p_T = [2/5, 2/5, 1/5]
      KL = 0.4 log(0.4/0.5) + 0.4 log(0.4/0.25) + 0.2 log(0.2/0.25) = 0.6 log 0.8 + 0.4 log 1.6
         = -0.1338861 + 0.1880015 = 0.0541153
      grad = 0.5 * ([2/3, 1/6, 1/6] - [1, 0, 0]) + 1 * ([1/2, 1/4, 1/4] - [2/5, 2/5, 1/5])
           = [-1/6, 1/12, 1/12] + [1/10, -3/20, 1/20] = [-1/15, -1/15, 2/15]
    Sums: CE = 1.5040774, KL = 0.4595804, loss = 0.5 * 1.5040774 + 0.5 * 4 * 0.4595804 = 1.6711996
    """
    ln2 = math.log(2)
    z_NV = torch.tensor([[0.0, 0.0, 0.0], [2 * ln2, 0.0, 0.0]], requires_grad=True)
    teacher_NV = torch.tensor([[0.0, 0.0, NEG_INF], [2 * ln2, 2 * ln2, 0.0]])
    sums = hybrid_loss(z_NV, torch.tensor([1, 0]), CountingTeacher(teacher_NV), alpha=0.5,
                       temperature=2.0)
    sums.loss.backward()
    assert sums.num_tokens == 2
    assert sums.ce.item() == pytest.approx(1.5040774, abs=1e-6)
    assert sums.kl.item() == pytest.approx(0.4595804, abs=1e-6)
    assert sums.loss.item() == pytest.approx(1.6711996, abs=1e-6)
    expected_grad = torch.tensor([[0.0, -1 / 2, 1 / 2], [-1 / 15, -1 / 15, 2 / 15]])
    torch.testing.assert_close(z_NV.grad, expected_grad, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- alpha == 1, teacher conventions


@pytest.mark.parametrize("teacher_fn", [None, never_called])
def test_alpha_one_is_cross_entropy_and_never_reads_the_teacher(teacher_fn):
    student_NV, _, targets_N = make_case(N=21, V=11, seed=4, ignore=(0, 5, 6, 20))
    z_NV = student_NV.clone().requires_grad_(True)
    sums = hybrid_loss(z_NV, targets_N, teacher_fn, alpha=1.0, temperature=2.0, chunk_size=4)
    sums.loss.backward()
    z_ref = student_NV.clone().requires_grad_(True)
    ref = F.cross_entropy(z_ref, targets_N, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert sums.num_tokens == 17
    assert sums.kl.item() == 0.0
    torch.testing.assert_close(sums.loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums.ce, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z_NV.grad, z_ref.grad, rtol=1e-5, atol=1e-7)
    # normalising the sum once by the count is the usual mean
    mean = F.cross_entropy(student_NV, targets_N, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(sums.loss.detach() / sums.num_tokens, mean, rtol=1e-6, atol=1e-6)


def test_teacher_additive_constant_per_row_does_not_matter():
    student_NV, teacher_NV, targets_N = make_case(seed=5)
    shifted_NV = teacher_NV + torch.linspace(-50, 50, teacher_NV.shape[0])[:, None]
    a = hybrid_loss(student_NV, targets_N, CountingTeacher(teacher_NV), alpha=0.2, temperature=1.5)
    b = hybrid_loss(student_NV, targets_N, CountingTeacher(shifted_NV), alpha=0.2, temperature=1.5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)


def test_one_hot_teacher_with_inf_gives_finite_loss_and_gradient():
    # a teacher row with a single finite entry: p_T is one-hot, every other term is 0 * log 0
    student_NV = torch.tensor([[3.0, -2.0, 0.5, 1.0], [0.0, 40.0, -40.0, 0.0]])
    teacher_NV = torch.full((2, 4), NEG_INF)
    teacher_NV[0, 2] = 7.0
    teacher_NV[1, 0] = -3.0
    teacher_NV[1, 1] = 100.0  # p_T[1, 0] underflows to exactly 0 at T=0.5
    z_NV = student_NV.clone().requires_grad_(True)
    sums = hybrid_loss(z_NV, torch.tensor([1, 2]), CountingTeacher(teacher_NV), alpha=0.0,
                       temperature=0.5)
    sums.loss.backward()
    _, _, ref_kl, ref_grad = naive_with_grad(student_NV, torch.tensor([1, 2]), teacher_NV, 0.0, 0.5)
    assert torch.isfinite(sums.loss) and torch.isfinite(z_NV.grad).all()
    torch.testing.assert_close(sums.kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_NV.grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_ignored_rows_are_never_read():
    # NaN in the student and teacher rows of ignored positions must not reach the sums or gradients
    student_NV, teacher_NV, targets_N = make_case(seed=6, ignore=(0, 6, 7, 12))
    ignored = targets_N == IGNORE_INDEX
    student_NV[ignored] = float("nan")
    teacher_NV[ignored] = float("nan")
    z_NV = student_NV.clone().requires_grad_(True)
    sums = hybrid_loss(z_NV, targets_N, CountingTeacher(teacher_NV), alpha=0.5, temperature=2.0,
                       chunk_size=4)
    sums.loss.backward()
    kept = ~ignored
    ref = hybrid_loss(student_NV[kept], targets_N[kept], CountingTeacher(teacher_NV[kept]),
                      alpha=0.5, temperature=2.0)
    torch.testing.assert_close(sums.loss.detach(), ref.loss.detach())
    assert torch.all(z_NV.grad[ignored] == 0) and torch.isfinite(z_NV.grad).all()


def test_no_counted_target_gives_zeros_without_calling_the_teacher():
    z_NV = torch.randn(5, 4, requires_grad=True)
    targets_N = torch.full((5,), IGNORE_INDEX)
    sums = hybrid_loss(z_NV, targets_N, never_called, alpha=0.5, temperature=2.0)
    sums.loss.backward()
    assert sums.num_tokens == 0
    assert sums.loss.item() == sums.ce.item() == sums.kl.item() == 0.0
    assert torch.all(z_NV.grad == 0)


# ---------------------------------------------------------------- sum property


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_sum_over_halves_equals_sum_over_batch(alpha):
    student_NV, teacher_NV, targets_N = make_case(N=24, V=9, seed=7, ignore=(3, 11, 12, 23))
    kw = dict(alpha=alpha, temperature=2.0, chunk_size=5)
    z_NV = student_NV.clone().requires_grad_(True)
    whole = hybrid_loss(z_NV, targets_N, CountingTeacher(teacher_NV), **kw)
    halves = [hybrid_loss(z_NV[s], targets_N[s], CountingTeacher(teacher_NV[s]), **kw)
              for s in (slice(0, 12), slice(12, 24))]
    for name in ("loss", "ce", "kl"):
        torch.testing.assert_close(getattr(whole, name),
                                   getattr(halves[0], name) + getattr(halves[1], name),
                                   rtol=1e-6, atol=1e-6)
    assert whole.num_tokens == halves[0].num_tokens + halves[1].num_tokens == 20
    # one normalisation by the global count: the same gradient either way
    (whole.loss / whole.num_tokens).backward()
    grad_whole, z_NV.grad = z_NV.grad.clone(), None
    ((halves[0].loss + halves[1].loss) / whole.num_tokens).backward()
    torch.testing.assert_close(z_NV.grad, grad_whole, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- chunks and memory


def test_teacher_is_asked_once_per_chunk_for_bounded_ranges():
    N, chunk_size = 50, 8
    student_NV, teacher_NV, targets_N = make_case(N=N, V=5, seed=8, ignore=())
    targets_N[20:37] = IGNORE_INDEX  # a padding run longer than two chunks
    targets_N[[0, 9, 49]] = IGNORE_INDEX
    teacher = CountingTeacher(teacher_NV)
    hybrid_loss(student_NV.requires_grad_(True), targets_N, teacher, alpha=0.5, temperature=2.0,
                chunk_size=chunk_size).loss.backward()
    counted = set((targets_N != IGNORE_INDEX).nonzero().squeeze(1).tolist())
    asked = [p for start, end in teacher.calls for p in range(start, end)]
    assert all(0 < end - start <= chunk_size for start, end in teacher.calls)
    assert len(asked) == len(set(asked)), f"a position was asked for twice: {teacher.calls}"
    assert counted <= set(asked)
    assert not set(range(20, 37)) & set(asked), "the padding run was handed to the teacher"
    # greedy chunks from the first counted position: [1,9) [10,18) [18,20) [37,45) [45,49)
    assert teacher.calls == [(1, 9), (10, 18), (18, 20), (37, 45), (45, 49)]


def test_all_counted_chunks_are_ceil_n_over_c():
    student_NV, teacher_NV, targets_N = make_case(N=29, V=5, seed=9, ignore=())
    teacher = CountingTeacher(teacher_NV)
    hybrid_loss(student_NV, targets_N, teacher, alpha=0.5, temperature=1.0, chunk_size=10)
    assert teacher.calls == [(0, 10), (10, 20), (20, 29)]


class _LargestTensors(TorchDispatchMode):
    """Records the largest tensor each dtype produced by any op under the mode (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest[t.dtype] = max(self.largest.get(t.dtype, 0), t.numel())
        return out


def test_no_full_fp32_tensor_of_n_by_v_is_ever_formed():
    N, V, chunk_size = 96, 64, 8
    student_NV, teacher_NV, targets_N = make_case(N=N, V=V, seed=10, ignore=(5, 50))
    z_NV = student_NV.bfloat16().requires_grad_(True)
    teacher = CountingTeacher(teacher_NV)
    with _LargestTensors() as mode:
        sums = hybrid_loss(z_NV, targets_N, teacher, alpha=0.5, temperature=2.0, chunk_size=chunk_size)
        (sums.loss / sums.num_tokens).backward()
    assert mode.largest[torch.float32] <= chunk_size * V, mode.largest
    assert mode.largest[torch.bfloat16] == N * V  # the one gradient buffer, in the student dtype
    assert z_NV.grad.dtype == torch.bfloat16

    # eval (no_grad): no (N, V) gradient buffer either
    with torch.no_grad(), _LargestTensors() as mode:
        hybrid_loss(z_NV, targets_N, teacher, alpha=0.5, temperature=2.0, chunk_size=chunk_size)
    assert max(mode.largest.values()) <= chunk_size * V, mode.largest


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("alpha, temperature, message", [
    (1.5, 2.0, "train.alpha must be in [0, 1], got 1.5"),
    (-0.1, 2.0, "train.alpha must be in [0, 1], got -0.1"),
    (float("nan"), 2.0, "train.alpha must be in [0, 1], got nan"),
    (0.5, 0.0, "train.temperature must be > 0 (and finite), got 0.0"),
    (0.5, -1.0, "train.temperature must be > 0 (and finite), got -1.0"),
    (0.5, float("inf"), "train.temperature must be > 0 (and finite), got inf"),
])
def test_bad_hyperparameters_raise_one_line_value_error(alpha, temperature, message):
    student_NV, teacher_NV, targets_N = make_case()
    with pytest.raises(ValueError) as err:
        hybrid_loss(student_NV, targets_N, CountingTeacher(teacher_NV), alpha=alpha,
                    temperature=temperature)
    assert str(err.value) == message


def test_kl_sum_rejects_bad_temperature():
    student_NV, teacher_NV, targets_N = make_case()
    with pytest.raises(ValueError, match=r"^train\.temperature must be > 0"):
        kl_sum(student_NV, CountingTeacher(teacher_NV), targets_N, 0.0)


def test_missing_teacher_with_alpha_below_one_raises():
    student_NV, _, targets_N = make_case()
    with pytest.raises(ValueError, match="teacher_logits_fn"):
        hybrid_loss(student_NV, targets_N, None, alpha=0.5, temperature=2.0)
