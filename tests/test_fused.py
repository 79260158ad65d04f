"""The fused loss (losses.head_loss, losses.model_loss: the student's output head inside the chunk loop) against
float64 references written out: logits = softcap(scale * (h W[:V]^T + b[:V])) in float64, then the explicit
per-position loops of reference_divergences.py, and torch.autograd on that float64 graph for the gradients w.r.t.
the hidden states, the head's weight and its bias. Also against the unfused path (tests/unfused.py, autograd
through fp32 logits), on tiny Hugging Face students built from configs (the fused path reproduces the model's
own logits: Llama tied and untied, Gemma 2's soft-cap, Cohere's logit_scale, Granite's logits_scaling), chunking,
ignored positions, bf16 autocast, the refusal of a student whose logits are not a linear head, and memory (no
(N, V) tensor on the student side).

Already covered elsewhere and not repeated here: accumulation k x b == kb and 2 FSDP ranks == 1 process
(test_trainer.py, test_api.py, test_sparse.py), the divergences over logits (test_divergences.py).

Tolerances: fp32 fused against float64 references within rtol 1e-5, with an absolute floor of 1e-5 times the
reference's largest entry (a gradient entry near 0 has no relative precision in fp32).

Shapes: N positions, d hidden size, P head rows (P >= V), V compared vocabulary, K sparse ids per position.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import unfused
from distill_pipe.config import ConfigError
from distill_pipe.divergences import SparseTargets
from distill_pipe.losses import IGNORE_INDEX, head_loss, model_loss
from distill_pipe.store import make_codec
from distill_pipe.store.codecs import Head
from distill_pipe.student_head import HeadSpec, check_linear_head, head_spec
from reference_divergences import dense_reference, sparse_reference
from test_losses import _LargestTensors  # the largest tensor each op creates, per dtype

NEG_INF = float("-inf")
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9), ("tvd", 0.5)]


def close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """got (any float dtype) == ref (float64) within rtol, with an absolute floor of rtol * max |ref|."""
    ref = ref.detach().double()
    torch.testing.assert_close(got.detach().double(), ref, rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1e-3))


# ---------------------------------------------------------------- references


def head_logits(h_Nd, W_Pd, b_P, spec: HeadSpec) -> torch.Tensor:
    """softcap(scale * (h W[:V]^T + b[:V])) by plain differentiable torch ops, in the inputs' dtype."""
    V = spec.vocab_size
    z = h_Nd @ W_Pd[:V].T
    if b_P is not None:
        z = z + b_P[:V]
    z = z * spec.scale
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    return z


def reference(h_Nd, W_Pd, b_P, spec, y_N, teacher, *, alpha, T, divergence, beta):
    """(loss, ce, div, dloss/dh, dloss/dW, dloss/db or None), float64: the head in float64, the loss by the explicit
    loops of reference_divergences (dense (N, V) logits or SparseTargets of all N rows), autograd through both."""
    leaves = [None if x is None else x.detach().double().requires_grad_(True) for x in (h_Nd, W_Pd, b_P)]
    z_NV = head_logits(*leaves, spec)
    kw = dict(alpha=alpha, T=T, divergence=divergence, beta=beta)
    if isinstance(teacher, SparseTargets):
        log_p, log_r = teacher.log_probs()
        loss, ce, div, g_NV = sparse_reference(z_NV.detach(), y_N, teacher.ids_CK.tolist(), log_p.double().tolist(),
                                               None if log_r is None else log_r.double().tolist(),
                                               teacher.neg_entropy_C.double().tolist(), **kw)
    else:
        loss, ce, div, g_NV = dense_reference(z_NV.detach(), y_N, teacher, **kw)
    z_NV.backward(g_NV)
    return (loss, ce, div, *(None if x is None else x.grad for x in leaves))


def fused(h_Nd, W_Pd, b_P, spec, y_N, teacher_fn, *, alpha, T, divergence, beta, chunk_size=4):
    """(LossSums, dloss/dh, dloss/dW, dloss/db or None) of head_loss on copies of the inputs."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (h_Nd, W_Pd, b_P)]
    sums = head_loss(*leaves, spec, y_N, teacher_fn, alpha=alpha, temperature=T, chunk_size=chunk_size,
                     divergence=divergence, beta=beta)
    sums.loss.backward()
    return (sums, *(None if x is None else x.grad for x in leaves))


def through_unfused(h_Nd, W_Pd, b_P, spec, y_N, teacher_fn, *, alpha, T, divergence, beta, chunk_size=4):
    """The same as `fused` by the old path: fp32 (N, V) logits by autograd, then unfused.hybrid_loss."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in (h_Nd, W_Pd, b_P)]
    sums = unfused.hybrid_loss(head_logits(*leaves, spec), y_N, teacher_fn, alpha=alpha, temperature=T,
                               chunk_size=chunk_size, divergence=divergence, beta=beta)
    sums.loss.backward()
    return (sums, *(None if x is None else x.grad for x in leaves))


def assert_fused_matches(h, W, b, spec, y, teacher_fn, teacher_all, **kw):
    """head_loss == the float64 reference and == the unfused path: sums, and gradients w.r.t. h, W and b."""
    sums, gh, gw, gb = fused(h, W, b, spec, y, teacher_fn, **kw)
    loss, ce, div, rh, rw, rb = reference(h, W, b, spec, y, teacher_all, **{k: v for k, v in kw.items()
                                                                              if k != "chunk_size"})
    assert torch.isfinite(sums.loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    close(sums.loss, loss)
    close(sums.ce, ce)
    close(sums.kl, div)
    close(gh, rh)
    close(gw, rw)
    if b is not None:
        close(gb, rb)
    old, oh, ow, ob = through_unfused(h, W, b, spec, y, teacher_fn, **kw)
    for got, want in ((sums.loss, old.loss), (sums.ce, old.ce), (sums.kl, old.kl), (gh, oh), (gw, ow)):
        close(got, want.double())
    if b is not None:
        close(gb, ob.double())
    assert sums.num_tokens == old.num_tokens == int((y != IGNORE_INDEX).sum())
    return gh, gw, gb


# ---------------------------------------------------------------- cases


def head_case(N=12, d=6, P=11, V=None, seed=0, bias=True):
    """(h (N, d), W (P, d), b (P,) or None, targets (N,) with 3 ignored, teacher logits (N, V))."""
    V = V or P
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    W = torch.randn(P, d, generator=g) * 0.6
    b = torch.randn(P, generator=g) * 0.3 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[[1, 5, 6]] = IGNORE_INDEX
    t = torch.randn(N, V, generator=g) * 2.5
    return h, W, b, y, t, g


def with_neg_inf(t_NV: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """Zero-probability entries (dense-u8's dropped tail) in columns 1.., never a whole row."""
    t = t_NV.clone()
    N, V = t.shape
    mask = torch.zeros(N * (V - 1), dtype=torch.bool)
    mask[torch.randperm(N * (V - 1), generator=g)[:count]] = True
    t[:, 1:][mask.view(N, V - 1)] = NEG_INF
    return t


def codec_targets(name: str, t_NV: torch.Tensor, T: float, **params) -> SparseTargets:
    """A sparse codec's targets of these teacher logits at T, through its own encode and decode (fp16 payload)."""
    codec = make_codec(name, temperature=T, **params)
    codec.payload_specs(t_NV.shape[1], None)
    payload = {n: v.reshape(t_NV.shape[0], *v.shape[2:]) for n, v in codec.encode(t_NV[None]).items()}
    return codec.sparse_targets(payload, T)


def teacher_of(family: str, t_NV: torch.Tensor, T: float, g: torch.Generator):
    """(teacher_fn over [start, end), what the reference reads: (N, V) float64-able logits or SparseTargets)."""
    N, V = t_NV.shape
    if family == "dense":
        return (lambda s, e: t_NV[s:e].clone()), t_NV
    if family == "dense-inf":
        t = with_neg_inf(t_NV, 15, g)
        return (lambda s, e: t[s:e].clone()), t
    if family == "factored":  # each chunk's logits formed from the teacher's hidden states and head, per call
        head = Head(torch.randn(V, 5, generator=g) * 0.8, torch.randn(V, generator=g) * 0.2)
        codec = make_codec("factored")
        hidden = (torch.randn(N, 5, generator=g) * 2).half()
        return (lambda s, e: codec.decode({"hidden": hidden[s:e]}, head)), codec.decode({"hidden": hidden}, head)
    params = {"topk": {"k": 4}, "sampled": {"draws": 6}, "headtail": {"head": 2, "draws": 4}}[family]
    targets = codec_targets(family, t_NV, T, **params)
    return (lambda s, e: targets.select(torch.arange(s, e))), targets


FAMILY_CASES = [(f, d, b) for f in ("dense", "dense-inf", "factored", "topk") for d, b in DIVERGENCES
                if not (f == "dense-inf" and d == "reverse_kl")]  # infinite there (test_divergences.py)
FAMILY_CASES += [(f, "forward_kl", 0.5) for f in ("sampled", "headtail")]  # no rest bucket: forward KL only


@pytest.mark.parametrize("family, divergence, beta", FAMILY_CASES)
def test_every_divergence_and_codec_family_matches_float64(family, divergence, beta):
    h, W, b, y, t, g = head_case(seed=1)
    T = 2.0
    fn, teacher = teacher_of(family, t, T, g)
    assert_fused_matches(h, W, b, HeadSpec(W.shape[0]), y, fn, teacher, alpha=0.3, T=T, divergence=divergence,
                         beta=beta)


# ---------------------------------------------------------------- head variants


@pytest.mark.parametrize("spec_kw", [
    {"scale": 0.0625},                 # Cohere's logit_scale (a multiplier)
    {"scale": 1 / 4.0},                # Granite's logits_scaling = 4 (a divisor)
    {"softcap": 2.5},                  # Gemma 2's final_logit_softcapping (small: tanh far from linear)
    {"scale": 3.0, "softcap": 4.0},
])
@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("jsd", 0.5), ("tvd", 0.5)])
def test_scale_and_softcap_match_float64(spec_kw, divergence, beta):
    h, W, b, y, t, g = head_case(seed=2)
    h = h * 2  # logits of a few units: the soft-cap bends them
    spec = HeadSpec(W.shape[0], **spec_kw)
    if spec.softcap:
        assert float(head_logits(h, W, b, HeadSpec(W.shape[0], spec.scale)).abs().max()) > spec.softcap
    assert_fused_matches(h, W, b, spec, y, lambda s, e: t[s:e], t, alpha=0.4, T=1.5, divergence=divergence,
                         beta=beta)


@pytest.mark.parametrize("bias", [True, False])
def test_padded_head_rows_are_never_compared_and_get_zero_gradient(bias):
    """A head of P = 15 rows over a compared vocabulary of V = 11: rows V.. (and their bias) get exactly 0."""
    h, W, b, y, t, g = head_case(P=15, V=11, seed=3, bias=bias)
    W[11:] = 50.0  # would dominate every softmax if they were formed
    gh, gw, gb = assert_fused_matches(h, W, b, HeadSpec(11, scale=0.5, softcap=3.0), y, lambda s, e: t[s:e], t,
                                      alpha=0.3, T=2.0, divergence="forward_kl", beta=0.5)
    assert gw.shape == W.shape and (gw[11:] == 0).all() and (gw[:11] != 0).any()
    if bias:
        assert gb.shape == b.shape and (gb[11:] == 0).all() and (gb[:11] != 0).any()


def test_alpha_one_is_cross_entropy_and_never_reads_the_teacher():
    h, W, b, y, t, g = head_case(seed=4)

    def never(s, e):
        raise AssertionError(f"teacher asked for [{s}, {e}) although alpha == 1")

    sums, gh, gw, gb = fused(h, W, b, HeadSpec(W.shape[0], softcap=3.0), y, never, alpha=1.0, T=2.0,
                             divergence="forward_kl", beta=0.5)
    loss, ce, div, rh, rw, rb = reference(h, W, b, HeadSpec(W.shape[0], softcap=3.0), y, None, alpha=1.0, T=2.0,
                                          divergence="forward_kl", beta=0.5)
    close(sums.loss, loss)
    close(sums.ce, ce)
    assert float(sums.kl) == 0.0
    for got, want in ((gh, rh), (gw, rw), (gb, rb)):
        close(got, want)


# ---------------------------------------------------------------- chunking, ignored positions


def test_chunk_size_one_whole_and_default_agree():
    h, W, b, y, t, g = head_case(N=20, seed=5)
    spec = HeadSpec(W.shape[0], scale=0.7, softcap=5.0)
    kw = dict(alpha=0.3, T=2.0, divergence="jsd", beta=0.5)
    fn = lambda s, e: t[s:e]  # noqa: E731
    one = fused(h, W, b, spec, y, fn, chunk_size=1, **kw)
    whole = fused(h, W, b, spec, y, fn, chunk_size=len(y), **kw)
    default = fused(h, W, b, spec, y, fn, chunk_size=None, **kw)  # one chunk at this size on CPU
    for a, c in zip(whole[1:], default[1:]):
        assert torch.equal(a, c)
    assert torch.equal(whole[0].loss, default[0].loss)
    for a, c in zip(one[1:], whole[1:]):
        close(a, c.double(), rtol=1e-6)
    for name in ("loss", "ce", "kl"):
        close(getattr(one[0], name), getattr(whole[0], name).double(), rtol=1e-6)
    assert one[0].num_tokens == whole[0].num_tokens == default[0].num_tokens == 17


def test_ignored_positions_are_excluded_and_counted_out():
    """NaN in the ignored rows of h and of the teacher changes nothing; those rows' gradient is exactly 0."""
    h, W, b, y, t, g = head_case(seed=6)
    ignored = y == IGNORE_INDEX
    h_nan, t_nan = h.clone(), t.clone()
    h_nan[ignored] = float("nan")
    t_nan[ignored] = float("nan")
    kw = dict(alpha=0.3, T=2.0, divergence="reverse_kl", beta=0.5, chunk_size=3)
    sums, gh, gw, gb = fused(h_nan, W, b, HeadSpec(W.shape[0]), y, lambda s, e: t_nan[s:e], **kw)
    assert sums.num_tokens == int((~ignored).sum()) == 9
    assert (gh[ignored] == 0).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    keep = ~ignored
    loss, ce, div, rh, rw, rb = reference(h[keep], W, b, HeadSpec(W.shape[0]), y[keep], t[keep], alpha=0.3, T=2.0,
                                          divergence="reverse_kl", beta=0.5)
    close(sums.loss, loss)
    close(gh[keep], rh)
    close(gw, rw)
    close(gb, rb)


def test_no_counted_position_gives_zeros_without_calling_the_teacher():
    h, W, b, y, t, g = head_case(seed=11)

    def never(s, e):
        raise AssertionError(f"teacher asked for [{s}, {e}) with no counted position")

    sums, gh, gw, gb = fused(h, W, b, HeadSpec(W.shape[0]), torch.full_like(y, IGNORE_INDEX), never, alpha=0.3,
                             T=2.0, divergence="tvd", beta=0.5)
    assert sums.num_tokens == 0 and float(sums.loss.detach()) == float(sums.ce) == float(sums.kl) == 0.0
    assert not gh.any() and not gw.any() and not gb.any()


def test_no_grad_gives_the_same_sums_as_training():
    """Evaluation runs head_loss under no_grad (no gradient formed): the sums are those of the training call."""
    h, W, b, y, t, g = head_case(seed=12)
    spec = HeadSpec(W.shape[0], scale=0.5, softcap=3.0)
    kw = dict(alpha=0.3, temperature=2.0, chunk_size=4, divergence="jsd", beta=0.9)
    train = head_loss(h.requires_grad_(True), W.requires_grad_(True), b, spec, y, lambda s, e: t[s:e], **kw)
    with torch.no_grad():
        evaluation = head_loss(h, W, b, spec, y, lambda s, e: t[s:e], **kw)
    assert not evaluation.loss.requires_grad
    for name in ("loss", "ce", "kl"):
        assert torch.equal(getattr(train, name).detach(), getattr(evaluation, name)), name


def test_bf16_head_and_hidden_states_get_bf16_gradients_of_the_fp32_math():
    """bf16 parameters (FSDP mixed precision): the loss upcasts to fp32 inside, so the sums match the float64
    reference at the bf16 values within fp32 precision, and the gradients come back in bf16, within one bf16
    rounding (2^-8 relative) of it."""
    h, W, b, y, t, g = head_case(seed=13)
    h, W, b = h.bfloat16(), W.bfloat16(), b.bfloat16()
    spec = HeadSpec(W.shape[0], softcap=3.0)
    kw = dict(alpha=0.3, T=2.0, divergence="forward_kl", beta=0.5)
    sums, gh, gw, gb = fused(h, W, b, spec, y, lambda s, e: t[s:e], **kw)
    loss, ce, div, rh, rw, rb = reference(h, W, b, spec, y, t, **kw)
    assert sums.loss.dtype == torch.float32 and gh.dtype == gw.dtype == gb.dtype == torch.bfloat16
    close(sums.loss, loss)
    for got, want in ((gh, rh), (gw, rw), (gb, rb)):
        close(got, want, rtol=2**-8)


# ---------------------------------------------------------------- real students


def tiny_student(kind: str):
    """A 2-layer student built from its config (no download), fp32, eval-free of dropout."""
    import transformers

    common = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common["tie_word_embeddings"] = kind in TIED
    torch.manual_seed(0)
    if kind in ("llama", "llama-tied"):
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=50.0,
                                        query_pre_attn_scalar=8, sliding_window=8, **common)
        model = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "cohere":
        cfg = transformers.CohereConfig(logit_scale=0.25, **common)
        model = transformers.CohereForCausalLM(cfg)
    elif kind == "granite":
        cfg = transformers.GraniteConfig(logits_scaling=4.0, **common)
        model = transformers.GraniteForCausalLM(cfg)
    else:
        assert kind == "phi", kind  # an lm_head with a bias
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**common))
    with torch.no_grad():  # a head large enough that scale and soft-cap matter
        model.get_output_embeddings().weight.mul_(8.0)
    return model


TIED = ("llama-tied", "gemma2", "cohere")  # Gemma 2 and Cohere tie by default
STUDENTS = ["llama", "llama-tied", "gemma2", "cohere", "granite", "phi"]
EXPECTED_SPEC = {"llama": (1.0, None), "llama-tied": (1.0, None), "gemma2": (1.0, 2.0), "cohere": (0.25, None),
                 "granite": (0.25, None), "phi": (1.0, None)}


def inner_param(model) -> torch.nn.Parameter:
    """A weight inside the first layer: its MLP's output projection."""
    mlp = model.model.layers[0].mlp
    return (mlp.fc2 if hasattr(mlp, "fc2") else mlp.down_proj).weight


@pytest.mark.parametrize("kind", STUDENTS)
def test_model_loss_reproduces_the_models_own_logits(kind):
    """model_loss (fp32) == the float64 reference over model(...).logits of a float64 copy: the loss and the
    gradients of the head's weight (tied: the embedding's, both paths), its bias (Phi), and a weight inside the
    first layer; and == the unfused path over the same model's fp32 logits."""
    model = tiny_student(kind)
    spec = head_spec(model)
    assert (spec.scale, spec.softcap) == EXPECTED_SPEC[kind]
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (kind in TIED)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 40, (2, 7), generator=g)
    y = torch.randint(0, 40, (2, 7), generator=g)
    y[0, :2] = IGNORE_INDEX
    t = torch.randn(14, 40, generator=g) * 2
    kw = dict(alpha=0.3, temperature=2.0, chunk_size=5, divergence="forward_kl", beta=0.5)  # the others: above

    sums = model_loss(model, ids, y, lambda s, e: t[s:e], vocab_size=None, **kw)
    sums.loss.backward()
    head_w, inner = model.get_output_embeddings().weight, inner_param(model)

    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    logits = model64(input_ids=ids, use_cache=False).logits.flatten(0, 1)
    loss, ce, div, g_NV = dense_reference(logits.detach(), y.flatten(), t, alpha=0.3, T=2.0)
    logits.backward(g_NV)
    close(sums.loss, loss)
    close(sums.ce, ce)
    close(sums.kl, div)
    close(head_w.grad, model64.get_output_embeddings().weight.grad)
    close(inner.grad, inner_param(model64).grad)
    if kind == "phi":
        close(model.get_output_embeddings().bias.grad, model64.get_output_embeddings().bias.grad)
    assert sums.num_tokens == 12

    old_model = copy.deepcopy(model)
    old_model.zero_grad()
    old = unfused.model_loss(old_model, ids, y, lambda s, e: t[s:e], vocab_size=None, **kw)
    old.loss.backward()
    close(sums.loss, old.loss.double())
    close(head_w.grad, old_model.get_output_embeddings().weight.grad.double())
    close(inner.grad, inner_param(old_model).grad.double())


def test_model_loss_compares_only_the_shared_vocabulary_of_a_padded_head():
    """vocab_size 30 of a 40-row untied head: the float64 reference over the model's first 30 logits; head rows
    30.. get exactly zero gradient."""
    model = tiny_student("llama")
    g = torch.Generator().manual_seed(14)
    ids = torch.randint(0, 40, (2, 7), generator=g)
    y = torch.randint(0, 30, (2, 7), generator=g)
    t = torch.randn(14, 30, generator=g) * 2
    sums = model_loss(model, ids, y, lambda s, e: t[s:e], vocab_size=30, alpha=0.3, temperature=2.0, chunk_size=4,
                      divergence="tvd")
    sums.loss.backward()
    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    logits = model64(input_ids=ids, use_cache=False).logits.flatten(0, 1)[:, :30]
    loss, _, _, g_NV = dense_reference(logits.detach(), y.flatten(), t, alpha=0.3, T=2.0, divergence="tvd")
    logits.backward(g_NV)
    head_w = model.get_output_embeddings().weight
    close(sums.loss, loss)
    close(head_w.grad, model64.get_output_embeddings().weight.grad)
    close(inner_param(model).grad, inner_param(model64).grad)
    assert (head_w.grad[30:] == 0).all()


def test_bf16_autocast_stays_close_to_the_float64_reference():
    """Under CPU bf16 autocast (the layers' matmuls in bf16, the head's in fp32 by HeadSpec.logits): finite, and
    within a bf16 tolerance of the float64 model: loss 2e-2 relative, gradients 5e-2 in relative norm (bf16 has
    8 mantissa bits, 4e-3 per rounding, through 2 layers)."""
    model = tiny_student("gemma2")
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 40, (2, 9), generator=g)
    y = torch.randint(0, 40, (2, 9), generator=g)
    t = torch.randn(18, 40, generator=g) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = model_loss(model, ids, y, lambda s, e: t[s:e], vocab_size=None, alpha=0.3, temperature=2.0,
                          chunk_size=4)
    sums.loss.backward()
    assert sums.loss.dtype == torch.float32 and torch.isfinite(sums.loss)
    model64 = copy.deepcopy(model).double()
    model64.zero_grad()
    logits = model64(input_ids=ids, use_cache=False).logits.flatten(0, 1)
    loss, _, _, g_NV = dense_reference(logits.detach(), y.flatten(), t, alpha=0.3, T=2.0)
    logits.backward(g_NV)
    assert abs(float(sums.loss.detach()) - float(loss)) <= 2e-2 * abs(float(loss))
    for got, want in ((model.get_output_embeddings().weight.grad, model64.get_output_embeddings().weight.grad),
                      (inner_param(model).grad, inner_param(model64).grad)):
        assert torch.isfinite(got).all()
        assert float((got.double() - want).norm()) <= 5e-2 * float(want.norm())


# ---------------------------------------------------------------- refusal of a non-linear head


class Squared(torch.nn.Module):
    """A student whose logits are a function of its head's output that no config declares: logits^2 / 4."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        out.logits = out.logits.square() / 4
        return out


def test_a_student_whose_logits_are_not_its_linear_head_is_refused(tmp_path):
    """check_linear_head (run by DistillTrainer before any step or write) refuses it with one line naming the
    problem and the fix; the plain model passes, and a Gemma 2 with its soft-cap passes."""
    from test_trainer import cfg, tiny_data

    from distill_pipe.trainer import DistillTrainer

    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(9))
    check_linear_head(tiny_student("llama"), ids)
    check_linear_head(tiny_student("gemma2"), ids)
    with pytest.raises(ConfigError) as err:
        check_linear_head(Squared(tiny_student("llama")), ids)
    message = str(err.value)
    assert "\n" not in message and "not a linear head" in message and "lm_head" in message

    out = tmp_path / "run"
    student = Squared(tiny_student("llama"))
    with pytest.raises(ConfigError, match="not a linear head"):
        DistillTrainer(student, cfg(alpha=1.0), {k: v % 40 for k, v in tiny_data().items()}, out_dir=out,
                       show_progress=False)
    assert not out.exists() or not any(out.iterdir())


class TwoHeads(Squared):
    """A student that calls its head twice (logits averaged over two last hidden states)."""

    def forward(self, input_ids, **kw):
        hidden = self.inner.model(input_ids=input_ids, **kw).last_hidden_state
        head = self.get_output_embeddings()
        out = self.inner(input_ids=input_ids, **kw)
        out.logits = (head(hidden) + head(hidden.flip(1))) / 2
        return out


@pytest.mark.parametrize("student, message", [
    (lambda: TwoHeads(tiny_student("llama")), "called its output head 3 times, not once"),
    (lambda: torch.nn.Linear(3, 3), "has no linear output head"),
])
def test_a_student_without_one_linear_head_call_is_refused(student, message):
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(9))
    with pytest.raises(ConfigError, match=message) as err:
        check_linear_head(student(), ids)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("family", ["dense", "topk"])
def test_no_n_by_v_tensor_on_the_student_side(family):
    """Forward and backward of head_loss over N = 512 positions, V = 1000, chunks of 64 (scale, soft-cap and a
    bias on): the largest tensor created is one chunk's (64, V), never N * V elements."""
    N, V, d, C = 512, 1000, 16, 64
    g = torch.Generator().manual_seed(10)
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * 0.3).requires_grad_(True)
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_(True)
    y = torch.randint(0, V, (N,), generator=g)
    t_hidden, t_W = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)  # chunk-sized teacher logits
    if family == "dense":
        fn = lambda s, e: t_hidden[s:e] @ t_W.T  # noqa: E731
    else:
        fn = lambda s, e: codec_targets("topk", t_hidden[s:e] @ t_W.T, 2.0, k=8)  # noqa: E731
    with _LargestTensors() as mode:
        sums = head_loss(h, W, b, HeadSpec(V, scale=0.5, softcap=10.0), y, fn, alpha=0.5, temperature=2.0,
                         chunk_size=C, divergence="forward_kl")
        (sums.loss / sums.num_tokens).backward()
    largest = max(mode.largest.values())  # any dtype
    assert largest < N * V, mode.largest
    assert largest <= C * V, mode.largest
    assert torch.isfinite(h.grad).all() and torch.isfinite(W.grad).all() and torch.isfinite(b.grad).all()


# ---------------------------------------------------------------- grad_scale: the head's gradient straight into .grad


class _NewStorages(TorchDispatchMode):
    """The largest storage (in elements of its dtype) any op under the mode allocated: views and in-place
    results, which share an argument's storage, are not counted (unlike _LargestTensors)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def _sinked(h, W, b, spec, y, t, *, scale, grad, backward_factor=None, **kw):
    """head_loss with grad_scale=scale on copies (W.grad set to `grad` first), backpropagated times
    backward_factor (default: scale); returns (sums, h.grad, W.grad, b.grad, largest tensor per dtype)."""
    h, W, b = (None if x is None else x.detach().clone().requires_grad_(True) for x in (h, W, b))
    W.grad = None if grad is None else grad.clone()
    with _NewStorages() as mode:
        sums = head_loss(h, W, b, spec, y, lambda s, e: t[s:e], temperature=2.0, grad_scale=scale, **kw)
        (sums.loss * (scale if backward_factor is None else backward_factor)).backward()
    return sums, h.grad, W.grad, None if b is None else b.grad, mode.largest


@pytest.mark.parametrize("existing, V", [(False, 50), (True, 50), (True, 41)])
def test_grad_scale_adds_the_scaled_head_gradient_into_grad_without_a_head_sized_buffer(existing, V):
    """With grad_scale the head's gradient goes into W.grad, times the scale, in the chunk loop: W.grad ends as
    what was there + scale * the float64 reference's, h's and b's gradients are the reference's times the scale,
    and no tensor of the head's size is created besides W.grad (without grad_scale there is one: the buffer).
    V = 41 < P = 50: a padded head, whose rows beyond V keep exactly what their .grad held."""
    N, d, P = 16, 64, 50  # the head (P x d) is larger than any chunk block (4 x P) or h (N x d)
    h, W, b, y, t, g = head_case(N=N, d=d, P=P, V=V, seed=21)
    spec = HeadSpec(V, scale=0.8, softcap=6.0)
    before = torch.randn(P, d, generator=g) if existing else None
    kw = dict(alpha=0.4, divergence="jsd", beta=0.3, chunk_size=4)
    sums, gh, gw, gb, largest = _sinked(h, W, b, spec, y, t, scale=0.125, grad=before, **kw)
    loss, ce, div, rh, rw, rb = reference(h, W, b, spec, y, t, alpha=0.4, T=2.0, divergence="jsd", beta=0.3)
    close(sums.loss, loss)
    close(gh, 0.125 * rh)
    close(gb, 0.125 * rb)
    close(gw, (0 if before is None else before.double()) + 0.125 * rw)
    if existing and V < P:
        assert torch.equal(gw[V:], before[V:])
    if existing:
        assert largest < P * d, largest  # W.grad was there: nothing of its size is made
    *_, plain = _sinked(h, W, b, spec, y, t, scale=None, grad=before, backward_factor=0.125, **kw)
    assert plain >= P * d, plain  # the buffer path, as a control that the count sees it


def test_grad_scale_with_another_backward_factor_is_an_error():
    h, W, b, y, t, g = head_case(seed=22)
    with pytest.raises(RuntimeError, match="grad_scale=0.5 .* backpropagated times 1"):
        _sinked(h, W, b, HeadSpec(W.shape[0]), y, t, scale=0.5, grad=None, backward_factor=1.0, alpha=0.5,
                chunk_size=4)


def test_grad_scale_leaves_bf16_and_hooked_heads_to_autograd():
    """A bf16 weight, or one with a post-accumulate-grad hook (what gradient reducers use), gets its gradient
    through autograd as without grad_scale: the same values, and the hook fires."""
    h, W, b, y, t, g = head_case(seed=23)
    spec, kw = HeadSpec(W.shape[0]), dict(alpha=0.5, temperature=2.0, chunk_size=4)
    ref = head_loss(h, W.clone().requires_grad_(True), b, spec, y, lambda s, e: t[s:e], **kw)
    Wr = W.clone().requires_grad_(True)
    (head_loss(h, Wr, b, spec, y, lambda s, e: t[s:e], **kw).loss * 0.25).backward()
    fired = []
    Wh = W.clone().requires_grad_(True)
    Wh.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    (head_loss(h, Wh, b, spec, y, lambda s, e: t[s:e], grad_scale=0.25, **kw).loss * 0.25).backward()
    assert len(fired) == 1 and torch.equal(fired[0], Wr.grad) and torch.equal(Wh.grad, Wr.grad)
    Wb = W.bfloat16().requires_grad_(True)
    (head_loss(h, Wb, b, spec, y, lambda s, e: t[s:e], grad_scale=0.25, **kw).loss * 0.25).backward()
    assert Wb.grad.dtype == torch.bfloat16
    close(Wb.grad, Wr.grad.double(), rtol=2e-2)
    del ref
