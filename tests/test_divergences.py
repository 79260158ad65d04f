"""Every divergence (train.divergence) against the float64 references of reference_divergences.py: dense teachers
with and without -inf entries, topk targets over their k + 1 outcomes, sampled targets (forward KL), every codec
at low temperature, hand-computed values, chunking invariance; padded teacher vocabularies in sparse targets;
refusals at train start (config, codec capability, the CLI) with nothing written.

Shapes: N positions, V vocabulary, K ids per position, R independent draws.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_pipe.config import ConfigError, TrainConfig, config_from_dict
from distill_pipe.divergences import SparseTargets, chunk_terms
from distill_pipe.losses import IGNORE_INDEX
from unfused import hybrid_loss
from distill_pipe.store import make_codec
from distill_pipe.store.codecs import Head

from reference_divergences import dense_reference, sparse_reference

NEG_INF = float("-inf")
# (divergence, beta): every divergence, and jsd across its beta range (0 and 1 are the two KLs exactly)
CONFIGS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("tvd", 0.5)] + [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
TEMPERATURES = (0.05, 0.5, 1.0, 2.0, 4.0)


def reverse_like(divergence, beta):
    return divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0)


def dense_case(N=13, V=7, seed=0, num_neg_inf=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 2
    t = torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    y[[2, 3, 9]] = IGNORE_INDEX
    flat = torch.randperm(N * (V - 1), generator=g)[:num_neg_inf]  # zero-probability entries, never a whole row
    mask = torch.zeros(N * (V - 1), dtype=torch.bool)
    mask[flat] = True
    t[:, 1:][mask.view(N, V - 1)] = NEG_INF  # (t[:, 1:].reshape(-1) would be a copy)
    return z, t, y


def run(z, y, teacher_fn, *, alpha, T, divergence, beta, chunk_size=4, grad_scale=1.0):
    zz = z.clone().requires_grad_(True)
    sums = hybrid_loss(zz, y, teacher_fn, alpha=alpha, temperature=T, chunk_size=chunk_size,
                       divergence=divergence, beta=beta)
    (sums.loss * grad_scale).backward()
    return sums, zz.grad


def assert_matches(sums, grad, ref, grad_rtol=1e-5):
    loss, ce, div, ref_grad = ref
    assert torch.isfinite(sums.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(sums.loss.detach().double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.ce.double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.kl.double(), div, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=1e-6)


# ---------------------------------------------------------------- dense teachers


DENSE_CASES = [(d, b, T, neg_inf) for d, b in CONFIGS for T in TEMPERATURES for neg_inf in (0, 12)
               if not (neg_inf and reverse_like(d, b))]  # those are infinite: the next test


@pytest.mark.parametrize("divergence, beta, T, neg_inf", DENSE_CASES)
def test_dense_matches_reference(divergence, beta, T, neg_inf):
    z, t, y = dense_case(seed=1, num_neg_inf=neg_inf)
    alpha = 0.3
    sums, grad = run(z, y, lambda s, e: t[s:e], alpha=alpha, T=T, divergence=divergence, beta=beta, grad_scale=1 / 7)
    assert_matches(sums, grad, dense_reference(z, y, t, alpha=alpha, T=T, divergence=divergence, beta=beta,
                                               grad_scale=1 / 7))


@pytest.mark.parametrize("T", (0.5, 2.0))
@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 1.0)])
def test_reverse_kl_of_a_zero_probability_token_is_infinite(divergence, beta, T):
    """KL(q || p) with p = 0 < q is +inf, as in theory: what chunk_terms returns (the stores that hold such zeros
    by construction refuse reverse KL at train start: test_dense_u8_with_a_dropped_tail_refuses_reverse_kl)."""
    z, t, y = dense_case(seed=1, num_neg_inf=12)
    ref = dense_reference(z, y, t, alpha=0.3, T=T, divergence=divergence, beta=beta)
    with torch.no_grad():
        sums = hybrid_loss(z, y, lambda s, e: t[s:e], alpha=0.3, temperature=T, divergence=divergence, beta=beta)
    assert ref[2] == math.inf and sums.kl.item() == math.inf and sums.loss.item() == math.inf


@pytest.mark.parametrize("divergence", ["jsd", "tvd", "forward_kl"])
def test_zero_probability_tokens_cost_what_the_definition_says(divergence):
    """A teacher with one finite entry (one-hot p_T): jsd and tvd are finite there and equal their closed forms."""
    z = torch.tensor([[1.0, -0.5, 2.0, 0.0]])
    t = torch.tensor([[NEG_INF, 3.0, NEG_INF, NEG_INF]])
    with torch.no_grad():
        d = hybrid_loss(z, torch.tensor([1]), lambda s, e: t[s:e], alpha=0.0, temperature=1.0, divergence=divergence,
                        beta=0.5).kl.item()
    q = torch.softmax(z.double(), -1)[0]
    if divergence == "tvd":  # 0.5 * ((1 - q_1) + sum of the other q) = 1 - q_1
        expected = 1 - q[1]
    elif divergence == "jsd":  # m_1 = (1 + q_1) / 2, m_v = q_v / 2 elsewhere
        m1 = (1 + q[1]) / 2
        expected = 0.5 * math.log(1 / m1) + 0.5 * (q[1] * math.log(q[1] / m1) + (1 - q[1]) * math.log(2))
    else:
        expected = -math.log(q[1])
    assert d == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("divergence, beta", CONFIGS)
def test_chunking_does_not_change_the_sums(divergence, beta):
    z, t, y = dense_case(N=24, V=9, seed=2)
    results = [run(z, y, lambda s, e: t[s:e], alpha=0.4, T=2.0, divergence=divergence, beta=beta, chunk_size=c)
               for c in (1, 5, 1024)]
    for sums, grad in results[1:]:
        torch.testing.assert_close(sums.loss, results[0][0].loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sums.kl, results[0][0].kl, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["dense", "topk"])
def test_jsd_beta_0_and_1_are_the_kls_exactly(kind):
    z, t, y = dense_case(seed=3)
    if kind == "dense":
        fn = lambda s, e: t[s:e]  # noqa: E731
    else:
        targets = topk_targets(t, k=3, T=2.0)
        fn = lambda s, e: targets.select(torch.arange(s, e))  # noqa: E731
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a, ga = run(z, y, fn, alpha=0.3, T=2.0, divergence="jsd", beta=beta)
        b, gb = run(z, y, fn, alpha=0.3, T=2.0, divergence=same, beta=0.5)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.kl, b.kl) and torch.equal(ga, gb)
    # and the formula between them is neither (its scale is about beta * (1 - beta) of the KLs')
    mid, _ = run(z, y, fn, alpha=0.3, T=2.0, divergence="jsd", beta=0.5)
    fwd, _ = run(z, y, fn, alpha=0.3, T=2.0, divergence="forward_kl", beta=0.5)
    assert 0 < mid.kl < fwd.kl


# ---------------------------------------------------------------- hand-computed values


def test_golden_hand_computed_values():
    """One position, V = 2, T = 1, alpha = 0, z = [0, 0] (q = [1/2, 1/2]), t = [ln 3, 0] (p = [3/4, 1/4]).

    reverse_kl = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 log(4/3) = 0.1438410
      h = q (log q - log p) = [1/2 log(2/3), 1/2 log 2], sum h = D
      grad = h - q D = [1/2 log(2/3) - 1/4 log(4/3), 1/2 log 2 - 1/4 log(4/3)] = [-0.2746530, 0.2746530]
    jsd, beta = 1/2: m = [5/8, 3/8]
      KL(p||m) = 3/4 log(6/5) + 1/4 log(2/3) = 0.1367412 - 0.1013663 = 0.0353749
      KL(q||m) = 1/2 log(4/5) + 1/2 log(4/3) = -0.1115718 + 0.1438410 = 0.0322693
      jsd = (0.0353749 + 0.0322693) / 2 = 0.0338221
      h = 1/2 q log(q/m) = [1/4 log(4/5), 1/4 log(4/3)], sum h = 1/2 KL(q||m) = 0.0161346
      grad = h - q sum h = [-0.0557859 - 0.0080673, 0.0719205 - 0.0080673] = [-0.0638532, 0.0638532]
    tvd = 1/2 (|3/4 - 1/2| + |1/4 - 1/2|) = 1/4
      h = 1/2 q sign(q - p) = [-1/4, 1/4], sum h = 0, grad = [-1/4, 1/4]
    With T = 2 the same p and q (t = [2 ln 3, 0], z = [0, 0]): D is the same, the gradient is halved, and the
    loss is T^2 D = 4 D.
    """
    expected = {"reverse_kl": (0.1438410, [-0.2746530, 0.2746530]), "jsd": (0.0338221, [-0.0638532, 0.0638532]),
                "tvd": (0.25, [-0.25, 0.25])}
    for divergence, (d, g) in expected.items():
        for T in (1.0, 2.0):
            z = torch.zeros(1, 2, requires_grad=True)
            t = torch.tensor([[T * math.log(3), 0.0]])
            sums = hybrid_loss(z, torch.tensor([0]), lambda s, e: t[s:e], alpha=0.0, temperature=T,
                               divergence=divergence, beta=0.5)
            sums.loss.backward()
            assert sums.kl.item() == pytest.approx(d, abs=1e-6), divergence
            assert sums.loss.item() == pytest.approx(T * T * d, abs=1e-6), divergence
            # loss = T^2 D and dD/dz = g / T: the loss's gradient is T g
            torch.testing.assert_close(z.grad, torch.tensor([g]) * T, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- sparse targets


def topk_targets(t_NV: torch.Tensor, k: int, T: float) -> SparseTargets:
    """The topk codec's targets of these teacher logits at T (fp16 payload: what training reads)."""
    codec = make_codec("topk", k=k, temperature=T)
    codec.payload_specs(t_NV.shape[1], None)
    payload = {n: v.reshape(t_NV.shape[0], *v.shape[2:]) for n, v in codec.encode(t_NV[None]).items()}
    return codec.sparse_targets(payload, T)


def sampled_targets(t_NV: torch.Tensor, draws: int, T: float, seed: int = 0) -> SparseTargets:
    codec = make_codec("sampled", draws=draws, temperature=T, seed=seed)
    codec.payload_specs(t_NV.shape[1], None)
    payload = {n: v.reshape(-1, *v.shape[2:]) for n, v in codec.encode(t_NV.reshape(1, -1, t_NV.shape[1])).items()}
    return codec.sparse_targets(payload, T)


def sparse_ref(z, y, t: SparseTargets, **kw):
    """sparse_reference fed with the targets' values in float64 (log space where the codec gives it)."""
    log_p, log_r = t.log_probs()
    return sparse_reference(z, y, t.ids_CK.tolist(), log_p.double().tolist(),
                            None if log_r is None else log_r.double().tolist(), t.neg_entropy_C.double().tolist(),
                            **kw)


def hand_bucket_targets(N, V, K, seed):
    """Targets with a rest bucket built by hand: random ids and masses, one padding slot (probability 0), linear
    probabilities only (no log fields)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    m = torch.rand(N, generator=g) * 0.4
    w = torch.rand(N, K, generator=g)
    w[0, -1] = 0.0
    w = w / w.sum(-1, keepdim=True) * (1 - m).unsqueeze(1)
    q = torch.cat([w, m[:, None]], -1)
    return SparseTargets(ids, w, m, torch.special.xlogy(q, q).sum(-1))


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("divergence, beta", CONFIGS)
def test_topk_over_k_plus_1_outcomes_matches_reference(divergence, beta, T):
    z, t, y = dense_case(N=11, V=9, seed=4)
    for targets in (topk_targets(t, k=4, T=T), hand_bucket_targets(11, 9, 4, seed=5)):
        sums, grad = run(z, y, lambda s, e: targets.select(torch.arange(s, e)), alpha=0.3, T=T,
                         divergence=divergence, beta=beta, chunk_size=3)
        assert_matches(sums, grad, sparse_ref(z, y, targets, alpha=0.3, T=T, divergence=divergence, beta=beta))


@pytest.mark.parametrize("T", (0.05, 0.1))
@pytest.mark.parametrize("divergence, beta", CONFIGS)
def test_topk_with_a_confident_student_whose_bucket_underflows(divergence, beta, T):
    """The student puts nearly all its mass on the teacher's top ids: at low T its bucket mass Q_R falls far below
    fp32's range (the log-space path), in some rows only; the sums and gradients still match the reference."""
    N, V, k = 6, 40, 4
    g = torch.Generator().manual_seed(11)
    t = torch.randn(N, V, generator=g) * 3
    targets = topk_targets(t, k=k, T=T)
    z = torch.randn(N, V, generator=g) * 0.5
    z[:3].scatter_add_(1, targets.ids_CK[:3], torch.full((3, k), 12.0))  # confident in 3 rows of 6
    y = targets.ids_CK[:, 0].clone()
    log_q = torch.log_softmax(z.double() / T, -1)
    log_q_rest = log_q.scatter(1, targets.ids_CK, NEG_INF).logsumexp(-1)
    assert (log_q_rest[:3] < math.log(1e-30)).all() and (log_q_rest[3:] > math.log(1e-3)).all()
    sums, grad = run(z, y, lambda s, e: targets.select(torch.arange(s, e)), alpha=0.3, T=T, divergence=divergence,
                     beta=beta, chunk_size=6)
    assert_matches(sums, grad, sparse_ref(z, y, targets, alpha=0.3, T=T, divergence=divergence, beta=beta),
                   grad_rtol=1e-4)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_sampled_forward_kl_matches_reference(T):
    z, t, y = dense_case(N=11, V=9, seed=6)
    targets = sampled_targets(t, draws=6, T=T)
    assert (targets.probs_CK == 0).any()  # padding slots (fewer unique ids than draws)
    for divergence, beta in (("forward_kl", 0.5), ("jsd", 0.0)):
        sums, grad = run(z, y, lambda s, e: targets.select(torch.arange(s, e)), alpha=0.3, T=T,
                         divergence=divergence, beta=beta, chunk_size=5)
        assert_matches(sums, grad, sparse_ref(z, y, targets, alpha=0.3, T=T))


@pytest.mark.parametrize("divergence, beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 1.0), ("tvd", 0.5)])
def test_targets_without_a_bucket_refuse_other_divergences(divergence, beta):
    z, t, y = dense_case(N=11, V=9, seed=6)
    targets = sampled_targets(t, draws=6, T=1.0)
    with pytest.raises(ValueError, match=r"needs the teacher's whole distribution or a rest bucket \(topk\)"):
        chunk_terms(z, y.clamp(min=0), targets, ce_weight=0.5, kd_weight=0.5, temperature=1.0, build_grad=True,
                    divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence, beta, message", [
    ("kl", 0.5, "train.divergence must be one of forward_kl, reverse_kl, jsd, tvd, got 'kl'"),
    ("jsd", 1.5, "train.beta must be in [0, 1], got 1.5"),
    ("jsd", float("nan"), "train.beta must be in [0, 1], got nan"),
])
def test_bad_divergence_arguments_raise_one_line_value_error(divergence, beta, message):
    z, t, y = dense_case()
    with pytest.raises(ValueError) as err:
        hybrid_loss(z, y, lambda s, e: t[s:e], alpha=0.5, temperature=2.0, divergence=divergence, beta=beta)
    assert str(err.value) == message


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_new_divergences_form_no_n_by_v_fp32_tensor(divergence):
    from test_losses import _LargestTensors

    N, V, chunk = 96, 64, 8
    z, t, y = dense_case(N=N, V=V, seed=7)
    targets = topk_targets(t, k=8, T=2.0)
    zz = z.bfloat16().requires_grad_(True)
    for fn in (lambda s, e: t[s:e], lambda s, e: targets.select(torch.arange(s, e))):
        with _LargestTensors() as mode:
            sums = hybrid_loss(zz, y, fn, alpha=0.5, temperature=2.0, chunk_size=chunk, divergence=divergence)
            sums.loss.backward()
        assert mode.largest[torch.float32] <= chunk * V, mode.largest
        assert mode.largest[torch.bfloat16] == N * V


# ---------------------------------------------------------------- low temperature on every codec (issue 21, 4)

LOW_T = (0.05, 0.1, 0.5, 1.0, 2.0)
LOW_T_CONFIGS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("tvd", 0.5)]


def codec_targets(name: str, t_NV: torch.Tensor, T: float, g: torch.Generator):
    """(teacher_fn, what the reference reads) for teacher logits t through each codec's own decode path."""
    N, V = t_NV.shape
    if name == "factored":  # logits = h @ W.T + b from fp16 hidden states, as the factored store decodes them
        d = 16
        head = Head(torch.randn(V, d, generator=g) * 0.7, torch.randn(V, generator=g) * 0.1)
        logits = make_codec("factored").decode({"hidden": (torch.randn(N, d, generator=g) * 3).half()}, head)
        return (lambda s, e: logits[s:e]), logits
    if name in ("dense-bf16", "dense-u8"):
        codec = make_codec(name, **({"tail_mass": 1e-2} if name == "dense-u8" else {}))
        codec.payload_specs(V, None)
        payload = {n: v.reshape(N, *v.shape[2:]) for n, v in codec.encode(t_NV[None]).items()}
        logits = codec.decode(payload, None)
        return (lambda s, e: logits[s:e]), logits
    targets = sampled_targets(t_NV, 16, T) if name == "sampled" else topk_targets(t_NV, 8, T)
    return (lambda s, e: targets.select(torch.arange(s, e))), targets


def low_t_cases():
    for name in ("dense-bf16", "factored", "dense-u8", "sampled", "topk"):
        for T in LOW_T:
            for divergence, beta in LOW_T_CONFIGS:
                codec = make_codec(name, **({"temperature": T} if name in ("sampled", "topk") else {}))
                if codec.check_temperature(T) is None and codec.check_divergence(divergence, beta) is None:
                    yield name, T, divergence, beta


@pytest.mark.parametrize("name, T, divergence, beta", list(low_t_cases()))
def test_every_codec_at_low_temperature_matches_reference(name, T, divergence, beta):
    """A near-uniform student over 200 tokens: log q = -5.3 per token, so exp(log q / T) underflows in fp32 for
    T < ~0.051 without the row maximum (the NaN of issue 21), and softmax(r / T) of the teacher underflows for
    most of the top k at T = 0.05. Finite, and equal to the float64 reference, on every codec."""
    N, V = 3, 200
    g = torch.Generator().manual_seed(8)
    z = torch.randn(N, V, generator=g) * 0.01
    t = torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    fn, teacher = codec_targets(name, t, T, g)
    sums, grad = run(z, y, fn, alpha=0.5, T=T, divergence=divergence, beta=beta, chunk_size=2)
    kw = dict(alpha=0.5, T=T, divergence=divergence, beta=beta)
    sparse = isinstance(teacher, SparseTargets)
    ref = sparse_ref(z, y, teacher, **kw) if sparse else dense_reference(z, y, teacher, **kw)
    assert_matches(sums, grad, ref, grad_rtol=1e-4)


def test_the_low_temperature_case_covers_every_codec_and_divergence():
    cases = list(low_t_cases())
    assert {c[0] for c in cases} == {"dense-bf16", "factored", "dense-u8", "sampled", "topk"}
    assert {c[2] for c in cases if c[0] == "topk"} == {"forward_kl", "reverse_kl", "jsd", "tvd"}
    assert {c[1] for c in cases if c[0] == "topk"} == set(LOW_T)
    assert {(c[2], c[1]) for c in cases if c[0] == "dense-u8"} == {(d, T) for d in ("forward_kl", "jsd", "tvd")
                                                                   for T in (0.05, 0.1, 0.5, 1.0)}


# ---------------------------------------------------------------- padded teacher vocabularies (issue 21, 7)


def padded_teacher(N=6, V=10, pad=4, seed=9, lift=3.0):
    """Teacher logits over V + pad ids, the padded ids lifted by `lift` among the most likely (a padded
    vocabulary's rows can be anything), and the student's V."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(N, V + pad, generator=g) * 2
    t[:, V:] += lift
    z = torch.randn(N, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    return z, t, y


@pytest.mark.parametrize("divergence, beta", CONFIGS)
def test_topk_padded_ids_mass_goes_to_the_rest_bucket(divergence, beta):
    """The k + 1 outcomes over the student's vocabulary: the in-vocabulary top ids, and one bucket holding every
    other token, whose teacher mass is the tail's plus the padded top ids' (which the student cannot express)."""
    V, k, T = 10, 5, 2.0
    z, t, y = padded_teacher(V=V)
    full = topk_targets(t, k=k, T=T)
    assert (full.ids_CK >= V).any(dim=1).all()  # every position has padded ids in its top k
    inside = full.within_vocab(V)
    sums, grad = run(z, y, lambda s, e: inside.select(torch.arange(s, e)), alpha=0.3, T=T, divergence=divergence,
                     beta=beta)
    # the reference from the full targets, by hand: keep the in-vocabulary ids, move the others' mass
    log_p, log_r = full.log_probs()
    ids, lp, lr, neg_h = [], [], [], []
    for n in range(len(full)):
        keep = [(i, p) for i, p in zip(full.ids_CK[n].tolist(), log_p[n].double().tolist()) if i < V]
        moved = [p for i, p in zip(full.ids_CK[n].tolist(), log_p[n].double().tolist()) if i >= V]
        rest = math.exp(float(log_r[n])) + sum(math.exp(p) for p in moved)
        ids.append([i for i, _ in keep])
        lp.append([p for _, p in keep])
        lr.append(math.log(rest))
        neg_h.append(sum(math.exp(p) * p for _, p in keep) + rest * math.log(rest))
    ref = sparse_reference(z, y, ids, lp, lr, neg_h, alpha=0.3, T=T, divergence=divergence, beta=beta)
    assert_matches(sums, grad, ref)
    torch.testing.assert_close(inside.probs_CK.sum(-1) + inside.rest_C, torch.ones(len(full)))  # no mass lost


def test_sampled_padded_draws_are_reweighted_to_the_shared_vocabulary():
    """Draws on padded ids carry no target the student can express. Given n' >= 1 of the n draws inside the
    vocabulary, those are i.i.d. from the teacher renormalised over it (p', what the dense path trains against:
    its logits are sliced to V), so reweighting them to the total is unbiased for p': the mean KD gradient over
    many independent draw sets is the dense path's times P(n' >= 1) = 1 - (1 - p(V))^n, within 4.5 standard
    errors everywhere. Dropping their mass (main before this change) gives p(V) times it: 0.26 to 0.84 here."""
    V, T, R, n = 8, 1.0, 4000, 8
    z, t, y = padded_teacher(N=3, V=V, pad=3, seed=10, lift=2.0)
    g_ce = dense_reference(z, y, None, alpha=1.0, T=T)[3]
    g_kd = dense_reference(z, y, t[:, :V], alpha=0.0, T=T)[3]
    p_in = torch.softmax(t.double() / T, -1)[:, :V].sum(-1)
    assert (p_in < 0.85).all() and ((1 - p_in) ** n < 0.1).all()  # masses the test can see
    expected = 0.5 * g_ce + 0.5 * (1 - (1 - p_in) ** n).unsqueeze(1) * g_kd
    targets = sampled_targets(t.repeat(R, 1), draws=n, T=T, seed=3).within_vocab(V)
    assert (targets.ids_CK < V).all()
    zz = z.repeat(R, 1).requires_grad_(True)
    hybrid_loss(zz, y.repeat(R), lambda s, e: targets.select(torch.arange(s, e)), alpha=0.5, temperature=T,
                chunk_size=4096).loss.backward()
    grads = zz.grad.double().reshape(R, 3, V)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(R)
    assert ((mean - expected).abs() <= 4.5 * se + 1e-7).all()


def test_within_vocab_without_a_bucket_rescales_or_drops_a_position():
    t = SparseTargets(torch.tensor([[1, 12, 3], [11, 12, 0]]), torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0]]),
                      None, torch.tensor([-1.0, -0.7]))
    inside = t.within_vocab(10)
    assert inside.ids_CK.tolist() == [[1, 0, 3], [0, 0, 0]]
    torch.testing.assert_close(inside.probs_CK, torch.tensor([[2 / 3, 0.0, 1 / 3], [0.0, 0.0, 0.0]]))
    assert inside.rest_C is None and torch.equal(inside.neg_entropy_C, t.neg_entropy_C)


# ---------------------------------------------------------------- refusals at train start


@pytest.mark.parametrize("entry, message", [
    ({"divergence": "kl"}, "train.divergence must be one of forward_kl, reverse_kl, jsd, tvd, got 'kl'"),
    ({"beta": 1.5}, "train.beta must be in [0, 1], got 1.5"),
    ({"beta": -0.1}, "train.beta must be in [0, 1], got -0.1"),
])
def test_config_validation(entry, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": entry})
    assert str(err.value) == message
    with pytest.raises(ConfigError) as err:  # per student, like every train key
        config_from_dict({"students": {"s": {"init": {"config": {}}, **entry}}})
    assert str(err.value) == message.replace("train.", "students.s.")


def test_beta_is_read_by_jsd_only_and_a_forward_kl_run_keeps_its_identity():
    from distill_pipe.train import _train_identity

    base = _train_identity(TrainConfig())
    assert "divergence" not in base and "beta" not in base  # the identity of the runs made before these keys
    assert _train_identity(TrainConfig(beta=0.9)) == base
    assert _train_identity(TrainConfig(divergence="tvd", beta=0.9)) == _train_identity(TrainConfig(divergence="tvd"))
    assert _train_identity(TrainConfig(divergence="jsd", beta=0.9))["beta"] == 0.9
    assert _train_identity(TrainConfig(divergence="jsd", beta=0.9)) != _train_identity(TrainConfig(divergence="jsd"))


@pytest.mark.parametrize("name, params, allowed", [
    ("sampled", {}, {"forward_kl"}),
    ("headtail", {}, {"forward_kl"}),
    ("topk", {}, {"forward_kl", "reverse_kl", "jsd", "tvd"}),
    ("factored", {}, {"forward_kl", "reverse_kl", "jsd", "tvd"}),
    ("dense-bf16", {}, {"forward_kl", "reverse_kl", "jsd", "tvd"}),
    ("dense-u8", {}, {"forward_kl", "jsd", "tvd"}),
    ("dense-u8", {"tail_mass": 0.0}, {"forward_kl", "reverse_kl", "jsd", "tvd"}),
])
def test_each_codec_declares_its_divergences(name, params, allowed):
    codec = make_codec(name, **params)
    assert set(codec.divergences) == allowed
    for d in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        assert (codec.check_divergence(d, 0.5) is None) == (d in allowed)
    assert codec.check_divergence("jsd", 0.0) is None  # forward KL exactly
    assert (codec.check_divergence("jsd", 1.0) is None) == ("reverse_kl" in allowed)


def test_dense_u8_with_a_dropped_tail_refuses_reverse_kl(tmp_path):
    from test_sparse import sparse_store, tiny_model

    from distill_pipe.trainer import DistillTrainer

    store, data = sparse_store(tmp_path, "dense-u8", {"tail_mass": 1e-2})
    out = tmp_path / "out"
    for divergence, beta in (("reverse_kl", 0.5), ("jsd", 1.0)):
        cfg = TrainConfig(alpha=0.5, temperature=1.0, divergence=divergence, beta=beta, batch_size=2, max_steps=1)
        with pytest.raises(ConfigError, match="cannot be computed from the dense-u8 store: it dropped its tail"):
            DistillTrainer(tiny_model(), cfg, data, store=store, out_dir=out, show_progress=False)
    assert not out.exists()
    # jsd below beta 1 is finite on the dropped tail: it trains
    cfg = TrainConfig(alpha=0.5, temperature=1.0, divergence="jsd", beta=0.9, batch_size=2, max_steps=1,
                      eval_steps=1, save_steps=100)
    tr = DistillTrainer(tiny_model(), cfg, data, store=store, out_dir=out, show_progress=False)
    tr.train()
    assert math.isfinite(tr.last_eval["eval_kl"]) and tr.last_eval["eval_kl"] > 0


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd", "tvd"])
def test_trainer_computes_the_chosen_divergence_from_a_topk_store(tmp_path, divergence):
    """DistillTrainer passes train.divergence down: its eval figure is the divergence of the store's targets
    (an explicit reference over the validation split), not the forward KL."""
    from test_sparse import sparse_store, tiny_model

    from distill_pipe.losses import shift_for_next_token
    from distill_pipe.trainer import DistillTrainer

    store, data = sparse_store(tmp_path, "topk", {"k": 8, "temperature": 2.0})
    cfg = TrainConfig(alpha=0.5, temperature=2.0, divergence=divergence, beta=0.3, batch_size=2, max_steps=1,
                      eval_steps=100, save_steps=100)
    model = tiny_model()
    tr = DistillTrainer(model, cfg, data, store=store, out_dir=tmp_path / "o", show_progress=False)
    with torch.no_grad():
        ev = tr.evaluate()
    ids = torch.as_tensor(np.asarray(data["validation"][...]), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.flatten(0, 1)
    y = shift_for_next_token(ids).flatten()
    tb = store.teacher_batch("validation", list(range(ids.shape[0])))
    targets = tb.sparse_targets(0, len(y), 2.0)
    _, _, div, _ = sparse_ref(logits, y, targets, alpha=0.5, T=2.0, divergence=divergence, beta=0.3)
    assert ev["eval_kl"] == pytest.approx(float(div) / int((y != IGNORE_INDEX).sum()), rel=1e-4)


@pytest.fixture(scope="module")
def sampled_project(tmp_path_factory, tiny_teacher) -> Path:
    from conftest import build_store_project

    return build_store_project(tmp_path_factory.mktemp("sampled_project"), tiny_teacher,
                               {"codec": "sampled", "codec_params": {"draws": 8, "temperature": 1.0}})


def test_cli_refuses_what_the_store_cannot_compute_and_writes_nothing(sampled_project, tmp_path, monkeypatch):
    import shutil

    import yaml

    from conftest import assert_one_line_error, run_cli

    root = tmp_path / "p"
    shutil.copytree(sampled_project, root)
    monkeypatch.chdir(root)
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"].update(batch_size=2, max_steps=1, eval_steps=1, save_steps=1, warmup_steps=0, temperature=1.0,
                           max_eval_sequences=2, calibration_tokens=64)
    params["students"] = {"kd": {"init": {"config": {"num_hidden_layers": 1}}, "divergence": "reverse_kl"}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    out = Path(params["paths"]["train"]) / "kd"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    code, text = run_cli("train", "--student", "kd")
    assert_one_line_error(code, text, "train.divergence reverse_kl cannot be computed from the sampled store")
    assert "use train.divergence forward_kl, or a store of codec factored, dense-bf16, dense-u8 or topk" in text
    code, text = run_cli("train", "--student", "kd", "--set", "students.kd.divergence=jsd",
                         "--set", "train.beta=1")
    assert_one_line_error(code, text, "train.divergence jsd with train.beta 1 (= reverse_kl) cannot be computed")
    for bad, fragment in (("students.kd.divergence=kl", "students.kd.divergence must be one of forward_kl"),
                          ("train.beta=2", "train.beta must be in [0, 1], got 2.0")):
        code, text = run_cli("train", "--student", "kd", "--set", bad)
        assert_one_line_error(code, text, fragment)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and (out / "notes.txt").read_text() == "mine"

    # jsd at beta 0 is forward KL exactly, which a sampled store allows: it trains
    code, text = run_cli("train", "--student", "kd", "--set", "students.kd.divergence=jsd", "--set", "train.beta=0")
    assert code == 0, text
    assert (out / "model").is_dir()
