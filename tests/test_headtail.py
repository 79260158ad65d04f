"""The `headtail` codec (the m most likely tokens exact, n draws from the rest): its gradient's unbiasedness against
the dense float64 gradient, its variance against pure sampling's at equal bytes, the store round trip against a
float64 encoder, draws that follow the sequence, bad input.

Shapes: N flattened positions, V vocabulary, R independent encodings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unfused import hybrid_loss  # the logits-based reference
from distill_pipe.store import make_codec
from tests.test_sparse import dense_reference, store_of


def peaked_teacher(N: int, V: int, g: torch.Generator) -> torch.Tensor:
    """Teacher logits (N, V) shaped like a trained LM's: Zipf-like ranks (log p ~ -1.3 log rank) with noise and a
    random token order per row; at T = 2 the top 8 of 64 hold about 0.6 of the mass."""
    ranks = torch.arange(1, V + 1, dtype=torch.float32)
    z = -2.6 * ranks.log() + torch.randn(N, V, generator=g) * 0.5
    return torch.stack([row[torch.randperm(V, generator=g)] for row in z])


def gradients(codec_name: str, params: dict, z_NV, t_NV, targets, T: float, alpha: float, R: int, tamper=None):
    """(R, N, V) float64 gradients of the hybrid loss, one per independent encoding of the same teacher rows, and the
    mean KL estimate. tamper: a function changing the payload in place before it is read."""
    N, V = z_NV.shape
    codec = make_codec(codec_name, temperature=T, **params)
    codec.payload_specs(V, None)
    payload = {k: v.reshape(R * N, *v.shape[2:]) for k, v in codec.encode(t_NV.repeat(R, 1, 1)).items()}
    if tamper:
        tamper(payload)
    z_RN = z_NV.repeat(R, 1).requires_grad_(True)
    sums = hybrid_loss(z_RN, targets.repeat(R),
                       lambda s, e: codec.sparse_targets({k: v[s:e] for k, v in payload.items()}, T),
                       alpha=alpha, temperature=T, chunk_size=512)
    sums.loss.backward()
    return z_RN.grad.double().reshape(R, N, V), float(sums.kl) / R


def small_case(alpha: float, T: float):
    """(student logits, teacher logits, targets, the dense float64 reference gradient) of 5 positions over 12 tokens."""
    N, V = 5, 12
    g = torch.Generator().manual_seed(0)
    z_NV = torch.randn(N, V, generator=g) * 1.5
    t_NV = torch.randn(N, V, generator=g) * 2.5
    targets = torch.randint(0, V, (N,), generator=g)
    return z_NV, t_NV, targets, dense_reference(z_NV, t_NV, targets.tolist(), alpha, T)


def test_headtail_gradient_is_unbiased_and_its_error_shrinks_with_draws():
    """R independent encodings: the mean gradient converges to the dense float64 gradient, every element within 4.5
    standard errors plus the fp16 rounding of the stored head (log-probs to 2^-11 of their log: |dp| <= 2.5e-3 p
    here, which moves a gradient element by less than 2e-4); the error of the mean shrinks like 1/sqrt(R)."""
    T, alpha, R = 2.0, 0.5, 6000
    z_NV, t_NV, targets, (_, ref_kl, ref_grad) = small_case(alpha, T)
    N, V = z_NV.shape
    grads_RNV, kl = gradients("headtail", {"head": 3, "draws": 4, "seed": 1}, z_NV, t_NV, targets, T, alpha, R)
    mean, se = grads_RNV.mean(0), grads_RNV.std(0) / math.sqrt(R)
    assert ((mean - ref_grad).abs() <= 4.5 * se + 2e-4).all(), float((mean - ref_grad).abs().max())
    assert kl == pytest.approx(ref_kl, rel=0.02)  # the KL value too (entropy in fp16)

    def err(r):  # error of the mean over r encodings, averaged over disjoint groups
        groups = grads_RNV[: (R // r) * r].reshape(R // r, r, N, V).mean(1)
        return float((groups - ref_grad).norm(dim=(1, 2)).mean())

    e10, e100, e1000 = err(10), err(100), err(1000)
    assert e100 < 0.45 * e10 and e1000 < 0.45 * e100, (e10, e100, e1000)  # 1/sqrt(10) = 0.32


def test_without_the_tail_weight_the_same_check_fails():
    """Negative control: the same payload with the tail's mass M read as ~0 (the head renormalised to 1, the draws
    weighing nothing: top-m renormalised, as DistillKit does) is biased, and the check above rejects it."""
    T, alpha, R = 2.0, 0.5, 2000
    z_NV, t_NV, targets, (_, _, ref_grad) = small_case(alpha, T)

    def no_tail_mass(payload):
        payload["stats"][:, 0] = -30.0  # M read as ~0: the draws get no weight, the head is renormalised to 1

    grads_RNV, _ = gradients("headtail", {"head": 3, "draws": 4, "seed": 1}, z_NV, t_NV, targets, T, alpha, R,
                             tamper=no_tail_mass)
    mean, se = grads_RNV.mean(0), grads_RNV.std(0) / math.sqrt(R)
    assert not ((mean - ref_grad).abs() <= 4.5 * se + 2e-4).all()


@pytest.mark.parametrize("sampled_draws, head, draws", [(16, 4, 10), (32, 10, 18)])
def test_headtail_variance_is_below_pure_sampling_at_equal_bytes(sampled_draws, head, draws):
    """At equal format bytes per position (uint16 ids: sampled 3n + 2, headtail 4m + 3n + 4), on a teacher shaped
    like a trained LM's, the KD gradient's variance (summed over the vocabulary, averaged over positions) of
    headtail is below a third of sampled's; each matches its closed form sum_v Var(w_v) * (kd / T)^2 within 10%:
    (1 - sum p^2) / n for sampled, (M^2 - sum_tail p^2) / n for headtail."""
    N, V, T, alpha, R = 6, 64, 2.0, 0.5, 3000
    g = torch.Generator().manual_seed(3)
    t_NV = peaked_teacher(N, V, g)
    z_NV = torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    specs = {}
    for name, params in (("sampled", {"draws": sampled_draws}), ("headtail", {"head": head, "draws": draws})):
        c = make_codec(name, **params)
        specs[name] = sum(int(np.prod(s.trailing)) * s.dtype.itemsize for s in c.payload_specs(V, None).values())
    assert specs["sampled"] == specs["headtail"]
    p_NV = torch.softmax(t_NV.double() / T, -1)
    scale = (1 - alpha) * T  # d(kd_weight * KL)/dz = kd_weight / T * (q - w), kd_weight = (1 - alpha) T^2
    var = {}
    for name, params, m, n in (("sampled", {"draws": sampled_draws}, 0, sampled_draws),
                               ("headtail", {"head": head, "draws": draws}, head, draws)):
        grads_RNV, _ = gradients(name, {**params, "seed": 4}, z_NV, t_NV, targets, T, alpha, R)
        var[name] = float(grads_RNV.var(0).sum(-1).mean())
        tail = p_NV.sort(-1, descending=True).values[:, m:]
        closed = float(((tail.sum(-1) ** 2 - (tail ** 2).sum(-1)) / n).mean()) * scale ** 2
        assert var[name] == pytest.approx(closed, rel=0.1), (name, var[name], closed)
    assert var["headtail"] < var["sampled"] / 3, var


def test_headtail_store_round_trip_against_fp64(tmp_path):
    """Through a real store: the head is the top m at Ts with its log-probs, the tail's draws avoid the head and
    sum to n, the stats are log M and H(p) of the float64 teacher; the draws' frequencies over many positions of
    one row converge to p / M on the tail; a masked row whose head holds everything keeps no draw."""
    V, m, n, T = 40, 5, 16, 2.0
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 8, V, generator=g) * 3
    logits[0, 0, 4:] = -math.inf  # 4 tokens: all in the head, no tail
    store = store_of(tmp_path, "headtail", {"head": m, "draws": n, "temperature": T}, logits, V)
    assert store.verify() == []
    tb = store.teacher_batch("train", [0, 1, 2])
    t = tb.sparse_targets(0, 24, T)
    x = logits.reshape(24, V).double()
    p = torch.softmax(x / T, -1)
    top = p.topk(m, -1)
    assert torch.equal(t.ids_CK[:, :m], top.indices)
    torch.testing.assert_close(t.probs_CK[:, :m].double(), top.values, rtol=4e-3, atol=1e-7)
    mass = 1 - top.values.sum(-1)
    counts = t.probs_CK[:, m:].double() / mass.clamp(min=1e-30).unsqueeze(1) * n
    torch.testing.assert_close(counts[1:], counts[1:].round(), rtol=0, atol=5e-3)  # M * count / n
    torch.testing.assert_close(counts[1:].sum(-1), torch.full((23,), float(n), dtype=torch.float64),
                               rtol=0, atol=0.05)
    assert float(t.probs_CK[0, m:].sum()) == 0  # no tail: no weight at any tail slot
    tail_ids = t.ids_CK[:, m:]
    for r in range(1, 24):
        drawn = set(tail_ids[r][t.probs_CK[r, m:] > 0].tolist())
        assert drawn and not drawn & set(top.indices[r].tolist())
    torch.testing.assert_close(t.probs_CK.sum(-1), torch.ones(24))  # a proper distribution
    h = -(p * p.log()).nan_to_num(0).sum(-1)
    torch.testing.assert_close(-t.neg_entropy_C.double(), h, rtol=2e-3, atol=2e-3)
    # decode: softmax(l / Ts) is the target
    w = torch.zeros(24, V).scatter_add_(1, t.ids_CK, t.probs_CK)
    torch.testing.assert_close(torch.softmax(tb.logits() / T, -1), w)
    # one teacher row at many positions: tail frequencies converge to p / M outside the head
    row = logits[1, 3]
    codec = make_codec("headtail", head=m, draws=200, temperature=T, seed=2)
    codec.payload_specs(V, None)
    pay = {k: v.reshape(500, *v.shape[2:]) for k, v in codec.encode(row.expand(1, 500, V)).items()}
    tt = codec.sparse_targets(pay, T)
    freq = torch.zeros(500, V).scatter_add_(1, tt.ids_CK, tt.probs_CK).mean(0).double()
    p_row = torch.softmax(row.double() / T, -1)
    assert (freq - p_row).abs().max() < 5 * math.sqrt(0.25 / 100_000)
    with pytest.raises(ValueError, match="set train.temperature 2"):
        tb.sparse_targets(0, 24, 1.0)


def test_headtail_draws_follow_the_sequence_not_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 50) * 3
    names = [f"train/{i}" for i in range(4)]
    whole = make_codec("headtail", head=4, draws=8).encode(logits, rows=names)
    for i in (3, 1, 0, 2):
        part = make_codec("headtail", head=4, draws=8).encode(logits[i:i + 1], rows=names[i:i + 1])
        assert all(torch.equal(whole[k][i:i + 1], part[k]) for k in whole)


def test_headtail_large_vocabulary_ids_are_int32():
    V = 70_000
    logits = torch.randn(1, 2, V)
    logits[0, :, V - 1] = 30.0
    codec = make_codec("headtail", head=2, draws=4)
    specs = codec.payload_specs(V, None)
    assert specs["head_ids"].dtype == specs["tail_ids"].dtype == np.int32
    payload = {k: v.reshape(2, *v.shape[2:]) for k, v in codec.encode(logits).items()}
    t = codec.sparse_targets(payload, 1.0)
    assert (t.ids_CK[:, 0] == V - 1).all() and (t.probs_CK[:, 0] > 0.99).all()


@pytest.mark.parametrize("params, message", [
    ({"head": 0}, "head must be an integer >= 1"),
    ({"draws": 0}, "draws must be an integer in 1..255"),
    ({"draws": 256}, "draws must be an integer in 1..255"),
    ({"temperature": 0}, "temperature must be > 0"),
])
def test_bad_headtail_params(params, message):
    with pytest.raises(ValueError, match=message):
        make_codec("headtail", **params)


def test_headtail_refusals_and_check_payload():
    codec = make_codec("headtail", head=8)
    with pytest.raises(ValueError, match="head=8 exceeds the vocabulary size 5; lower head"):
        codec.payload_specs(5, None)
    with pytest.raises(ValueError, match="NaN, \\+inf or an all -inf row"):
        make_codec("headtail", head=2).encode(torch.full((1, 2, 6), math.nan))
    assert codec.check_divergence("forward_kl", 0.5) is None
    assert "cannot be computed from the headtail store" in codec.check_divergence("reverse_kl", 0.5)
    codec = make_codec("headtail", head=2, draws=4)
    codec.payload_specs(10, None)
    good = {k: v.numpy() for k, v in codec.encode(torch.randn(1, 3, 10)).items()}
    assert codec.check_payload(good) is None
    bad = dict(good, tail_counts=good["tail_counts"].copy())
    bad["tail_counts"][0, 0, 0] += 1
    assert "do not sum to draws=4" in codec.check_payload(bad)
    bad = dict(good, head_logprobs=good["head_logprobs"][..., ::-1].copy())
    assert "not a descending row" in codec.check_payload(bad)
