"""Sparse teacher targets (`sampled`, `topk` codecs): the loss against explicit float64 loops, the sampled
gradient's unbiasedness against the dense gradient, the codecs against naive encoders through a real store,
temperature refusals, exact accumulation when training from a sparse store.

Shapes: N flattened positions, V vocabulary, K ids per position, R independent draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill_pipe.config import ConfigError, TrainConfig
from distill_pipe.losses import IGNORE_INDEX, SparseTargets
from unfused import hybrid_loss
from distill_pipe.store import create_store, make_codec, open_store
from distill_pipe.store.writer import write_shard


def naive_sparse(z_NV, targets, ids, probs, rest, neg_entropy, alpha, T):
    """(loss, kl) by loops: CE at T=1 plus KL over the K ids and, with `rest`, one bucket holding every other token."""
    N, V = z_NV.shape
    ce = kl = z_NV.new_zeros(())
    for n in range(N):
        if targets[n] == IGNORE_INDEX:
            continue
        z = [z_NV[n, v] for v in range(V)]
        lse = torch.log(sum(torch.exp(x) for x in z))
        ce = ce + lse - z[targets[n]]
        lse_t = torch.log(sum(torch.exp(x / T) for x in z))
        k_n = kl.new_tensor(neg_entropy[n])
        for i, w in zip(ids[n], probs[n]):
            k_n = k_n - w * (z[i] / T - lse_t)
        if rest is not None and rest[n] > 0:
            q_rest = sum(torch.exp(z[v] / T - lse_t) for v in range(V) if v not in ids[n])
            k_n = k_n - rest[n] * torch.log(q_rest)
        kl = kl + k_n
    return alpha * ce + (1 - alpha) * T * T * kl, kl


def case(N=11, V=9, K=4, seed=0, rest=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 2
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 7]] = IGNORE_INDEX
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    m = torch.rand(N, generator=g) * 0.3 if rest else None
    w = w / w.sum(-1, keepdim=True) * (1 - (m if rest else 0)).unsqueeze(-1) if rest else w / w.sum(-1, keepdim=True)
    if not rest:
        w[0, -1] = 0  # a padding slot (count 0)
        w[0] /= w[0].sum()
    neg_h = -torch.rand(N, generator=g)
    return z, targets, SparseTargets(ids, w, m, neg_h)


@pytest.mark.parametrize("rest", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [3, 64])
def test_sparse_loss_matches_explicit_loop(rest, T, chunk):
    z, targets, t = case(rest=rest)
    alpha = 0.3
    zz = z.clone().requires_grad_(True)
    sums = hybrid_loss(zz, targets, lambda s, e: t.select(torch.arange(s, e)), alpha=alpha, temperature=T,
                       chunk_size=chunk)
    (sums.loss * 0.5).backward()
    z64 = z.double().requires_grad_(True)
    loss, kl = naive_sparse(z64, targets.tolist(), t.ids_CK.tolist(), t.probs_CK.double().tolist(),
                            None if t.rest_C is None else t.rest_C.double().tolist(), t.neg_entropy_C.double().tolist(),
                            alpha, T)
    (loss * 0.5).backward()
    assert sums.num_tokens == 9
    assert float(sums.loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(sums.kl) == pytest.approx(float(kl.detach()), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_sparse_targets_form_no_n_by_v_fp32_tensor():
    from test_losses import _LargestTensors

    N, V, chunk = 96, 64, 8
    g = torch.Generator().manual_seed(3)
    z = torch.randn(N, V, generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(0, V, (N,), generator=g)
    logits = torch.randn(1, N, V, generator=g) * 3
    for name, params in (("sampled", {"draws": 16, "temperature": 2.0}), ("topk", {"k": 8, "temperature": 2.0})):
        codec = make_codec(name, **params)
        codec.payload_specs(V, None)
        payload = {k: v.reshape(N, *v.shape[2:]) for k, v in codec.encode(logits).items()}
        with _LargestTensors() as mode:
            sums = hybrid_loss(z, targets, lambda s, e: codec.sparse_targets({k: v[s:e] for k, v in payload.items()}, 2.0),
                               alpha=0.5, temperature=2.0, chunk_size=chunk)
            sums.loss.backward()
        assert mode.largest[torch.float32] <= chunk * V, (name, mode.largest)
        assert mode.largest[torch.bfloat16] == N * V  # the student's own gradient buffer


# ---------------------------------------------------------------- unbiasedness of the sampled target


def dense_reference(z_NV, t_NV, targets, alpha, T):
    """Loss and gradient of alpha*CE + (1-alpha)*T^2*KL(p_T || q_T) by explicit softmax loops, float64."""
    z64 = z_NV.double().requires_grad_(True)
    N, V = z_NV.shape
    loss = kl = z64.new_zeros(())
    for n in range(N):
        if targets[n] == IGNORE_INDEX:
            continue
        z = [z64[n, v] for v in range(V)]
        lse = torch.log(sum(torch.exp(x) for x in z))
        lse_t = torch.log(sum(torch.exp(x / T) for x in z))
        e = [math.exp(float(t_NV[n, v]) / T) for v in range(V)]
        p = [x / sum(e) for x in e]
        kl_n = sum(p[v] * (math.log(p[v]) - (z[v] / T - lse_t)) for v in range(V))
        loss = loss + alpha * (lse - z[targets[n]]) + (1 - alpha) * T * T * kl_n
        kl = kl + kl_n
    loss.backward()
    return float(loss), float(kl), z64.grad


def test_sampled_gradient_is_unbiased_and_its_error_shrinks_with_draws():
    """R independent sampled encodings of the same teacher rows: the mean KD gradient converges to the dense
    gradient (an explicit softmax loop); every element within 4.5 standard errors, and the error of the mean
    shrinks like 1/sqrt(R)."""
    N, V, T, alpha, n, R = 5, 12, 2.0, 0.5, 4, 6000
    g = torch.Generator().manual_seed(0)
    z_NV = torch.randn(N, V, generator=g) * 1.5
    t_NV = torch.randn(N, V, generator=g) * 2.5
    targets = torch.randint(0, V, (N,), generator=g)
    ref_loss, ref_kl, ref_grad = dense_reference(z_NV, t_NV, targets.tolist(), alpha, T)

    codec = make_codec("sampled", draws=n, temperature=T, seed=1)
    codec.payload_specs(V, None)
    payload = {k: v.reshape(R * N, *v.shape[2:]) for k, v in codec.encode(t_NV.repeat(R, 1, 1)).items()}
    z_RN = z_NV.repeat(R, 1).requires_grad_(True)
    sums = hybrid_loss(z_RN, targets.repeat(R), lambda s, e: codec.sparse_targets({k: v[s:e] for k, v in payload.items()}, T),
                       alpha=alpha, temperature=T, chunk_size=512)
    sums.loss.backward()
    grads_RNV = z_RN.grad.double().reshape(R, N, V)  # one gradient per independent draw set
    mean, se = grads_RNV.mean(0), grads_RNV.std(0) / math.sqrt(R)
    assert (mean - ref_grad).abs().max() <= 4.5 * se.max()
    assert ((mean - ref_grad).abs() <= 4.5 * se + 1e-7).all()
    # the KL value is unbiased too (entropy stored in fp16: 1e-3 relative)
    assert float(sums.kl) / R == pytest.approx(ref_kl, rel=0.02)

    def err(r):  # error of the mean over r draw sets, averaged over disjoint groups
        groups = grads_RNV[: (R // r) * r].reshape(R // r, r, N, V).mean(1)
        return float((groups - ref_grad).norm(dim=(1, 2)).mean())

    e10, e100, e1000 = err(10), err(100), err(1000)
    assert e100 < 0.45 * e10 and e1000 < 0.45 * e100, (e10, e100, e1000)  # 1/sqrt(10) = 0.32


def test_a_biased_estimator_fails_the_same_check():
    """Negative control: renormalised top-2 targets (DistillKit's renormalise) are not the dense gradient."""
    N, V, T = 5, 12, 2.0
    g = torch.Generator().manual_seed(0)
    z_NV = torch.randn(N, V, generator=g) * 1.5
    t_NV = torch.randn(N, V, generator=g) * 2.5
    targets = torch.randint(0, V, (N,), generator=g)
    _, _, ref_grad = dense_reference(z_NV, t_NV, targets.tolist(), 0.5, T)
    p = torch.softmax(t_NV / T, -1)
    top = p.topk(2, -1)
    t = SparseTargets(top.indices, top.values / top.values.sum(-1, keepdim=True), None, torch.zeros(N))
    zz = z_NV.clone().requires_grad_(True)
    hybrid_loss(zz, targets, lambda s, e: t.select(torch.arange(s, e)), alpha=0.5, temperature=T).loss.backward()
    assert (zz.grad.double() - ref_grad).abs().max() > 0.05


# ---------------------------------------------------------------- codecs


def store_of(tmp_path, name, params, logits_NLV, vocab):
    codec = make_codec(name, **params)
    N, L, _ = logits_NLV.shape
    ids = np.zeros((N, L), dtype=np.int32)
    st = create_store(tmp_path / f"{name}.zarr", attrs={}, splits={"train": ids, "validation": ids[:1]}, codec=codec,
                      shard_size=N, vocab_size=vocab)
    payload = {k: v for k, v in codec.encode(logits_NLV).items()}
    write_shard(st, "train", 0, payload)
    write_shard(st, "validation", 0, {k: v[:1] for k, v in payload.items()})
    return open_store(tmp_path / f"{name}.zarr")


def test_sampled_codec_round_trip_and_frequencies(tmp_path):
    V, n, T = 40, 64, 2.0
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 8, V, generator=g) * 3
    logits[0, 0, 5:] = -math.inf  # a masked vocabulary: never drawn
    store = store_of(tmp_path, "sampled", {"draws": n, "temperature": T}, logits, V)
    assert store.verify() == []
    tb = store.teacher_batch("train", [0, 1, 2])
    t = tb.sparse_targets(0, 24, T)
    counts = torch.zeros(24, V).scatter_add_(1, t.ids_CK, t.probs_CK * n)
    assert torch.equal(counts.sum(-1), torch.full((24,), float(n)))
    assert (counts == counts.round()).all()
    assert counts[0, 5:].sum() == 0
    ids_nonzero = [sorted(i for i, w in zip(r, c) if w > 0) for r, c in zip(t.ids_CK.tolist(), t.probs_CK.tolist())]
    assert all(len(set(r)) == len(r) for r in ids_nonzero)  # unique ids
    p = torch.softmax(logits.reshape(24, V) / T, -1)
    h = -(p * p.log()).nan_to_num(0).sum(-1)
    torch.testing.assert_close(-t.neg_entropy_C, h, rtol=2e-3, atol=2e-3)
    # decode: softmax(l / Ts) is the empirical distribution
    torch.testing.assert_close(torch.softmax(tb.logits() / T, -1), counts / n)
    # many positions with one teacher row: frequencies converge to p_T
    row = logits[1, 3]
    codec = make_codec("sampled", draws=200, temperature=T, seed=2)
    codec.payload_specs(V, None)
    pay = {k: v.reshape(500, *v.shape[2:]) for k, v in codec.encode(row.expand(1, 500, V)).items()}
    tt = codec.sparse_targets(pay, T)
    freq = torch.zeros(500, V).scatter_add_(1, tt.ids_CK, tt.probs_CK).mean(0)
    p_row = torch.softmax(row / T, -1)
    assert (freq - p_row).abs().max() < 5 * math.sqrt(0.25 / 100_000)


def test_topk_codec_against_fp64_reference(tmp_path):
    V, k, T = 300, 16, 2.0
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 8, V, generator=g) * 4
    store = store_of(tmp_path, "topk", {"k": k, "temperature": T}, logits, V)
    assert store.verify() == []
    tb = store.teacher_batch("train", [0, 1])
    x = logits.reshape(16, V).double()
    for temp in (1.0, T):
        t = tb.sparse_targets(0, 16, temp)
        p = torch.softmax(x / temp, -1)
        top = torch.topk(x, k, -1).indices
        assert torch.equal(t.ids_CK, top)
        torch.testing.assert_close(t.probs_CK.double(), p.gather(1, top), rtol=4e-3, atol=1e-6)
        rest = 1 - p.gather(1, top).sum(-1)
        torch.testing.assert_close(t.rest_C.double(), rest, rtol=2e-3, atol=1e-7)
        torch.testing.assert_close(t.probs_CK.sum(-1) + t.rest_C, torch.ones(16))  # a proper distribution
        q = torch.cat([p.gather(1, top), rest[:, None]], -1)
        torch.testing.assert_close(t.neg_entropy_C.double(), (q * q.log()).sum(-1), rtol=2e-3, atol=2e-3)
    # decode at Ts: the top k exact, the tail spread evenly
    d = torch.softmax(tb.logits() / T, -1).double()
    p = torch.softmax(x / T, -1)
    top = torch.topk(x, k, -1).indices
    torch.testing.assert_close(d.gather(1, top), p.gather(1, top), rtol=4e-3, atol=1e-6)
    assert float(d.sum(-1).sub(1).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="set train.temperature 1 or 2"):
        tb.sparse_targets(0, 16, 3.0)


@pytest.mark.parametrize("V, dtype", [(49_152, np.uint16), (70_000, np.int32)])
def test_large_ids_round_trip(V, dtype):
    """Ids above int16's range in uint16 (V <= 65,536), int32 beyond."""
    logits = torch.randn(1, 2, V)
    logits[0, :, V - 1] = 30.0
    for name, params in (("sampled", {"draws": 4}), ("topk", {"k": 3})):
        codec = make_codec(name, **params)
        specs = codec.payload_specs(V, None)
        payload = {k: v.reshape(2, *v.shape[2:]) for k, v in codec.encode(logits).items()}
        ids = next(v for k, v in payload.items() if k.endswith("ids"))
        assert specs[next(k for k in specs if k.endswith("ids"))].dtype == dtype and ids.numpy().dtype == dtype
        t = codec.sparse_targets(payload, 1.0)
        assert (t.ids_CK[t.probs_CK > 0.5] == V - 1).all() and (t.probs_CK > 0.5).sum() == 2


@pytest.mark.parametrize("name, params, message", [
    ("sampled", {"draws": 0}, "draws must be an integer in 1..255"),
    ("sampled", {"draws": 256}, "draws must be an integer in 1..255"),
    ("sampled", {"temperature": 0}, "temperature must be > 0"),
    ("topk", {"k": 0}, "k must be an integer >= 1"),
    ("topk", {"temperature": -1}, "temperature must be > 0"),
])
def test_bad_codec_params(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_codec(name, **params)


def test_topk_k_beyond_vocab_and_check_payload():
    codec = make_codec("topk", k=8)
    with pytest.raises(ValueError, match="k=8 exceeds the vocabulary size 5; lower k"):
        codec.payload_specs(5, None)
    codec = make_codec("sampled", draws=4)
    bad = {"sample_counts": np.array([[[1, 1, 0, 0]]], dtype=np.uint8)}
    assert "do not sum to draws=4" in codec.check_payload(bad)


# ---------------------------------------------------------------- training from a sparse store

V_T, L_T = 64, 16


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V_T, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))


def sparse_store(tmp_path, name, params, n=16):
    rng = np.random.default_rng(0)
    ids = ((rng.integers(0, V_T, (n + 4, 1)) + np.arange(L_T)) % V_T).astype(np.int32)
    codec = make_codec(name, **params)
    st = create_store(tmp_path / f"{name}.zarr", attrs={}, splits={"train": ids[:n], "validation": ids[n:]},
                      codec=codec, shard_size=4, vocab_size=V_T)
    g = torch.Generator().manual_seed(1)
    for split, arr in (("train", ids[:n]), ("validation", ids[n:])):
        logits = torch.randn(len(arr), L_T, V_T, generator=g) * 3
        for k in range(st.num_shards(split)):
            a, b = st.shard_range(split, k)
            write_shard(st, split, k, codec.encode(logits[a:b]))
    st = open_store(tmp_path / f"{name}.zarr")
    return st, {"train": st.input_ids("train"), "validation": st.input_ids("validation")}


@pytest.mark.parametrize("name, params", [("sampled", {"draws": 8, "temperature": 2.0}),
                                          ("topk", {"k": 8, "temperature": 2.0}),
                                          ("headtail", {"head": 4, "draws": 8, "temperature": 2.0})])
def test_accumulation_from_a_sparse_store_is_exact(tmp_path, name, params):
    """4 micro-batches of 2 give the gradient of 1 batch of 8 (every optimizer step's gradient compared; Adam
    would turn float noise in a near-zero gradient element into a full lr step, so weights are not)."""
    from distill_pipe.trainer import DistillTrainer

    store, data = sparse_store(tmp_path, name, params)
    grads, evals = [], []
    for b, acc in ((2, 4), (8, 1)):
        c = TrainConfig(alpha=0.5, temperature=2.0, batch_size=b, gradient_accumulation_steps=acc,
                        learning_rate=3e-3, max_steps=3, eval_steps=100, save_steps=100, loss_chunk_size=5, seed=2)
        model = tiny_model()
        tr = DistillTrainer(model, c, data, store=store, out_dir=tmp_path / f"{b}x{acc}", show_progress=False)
        seen, step = [], tr.optimizer.step

        def record(*a, **kw):
            seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
            return step(*a, **kw)

        tr.optimizer.step = record
        tr.train()
        grads.append(seen)
        evals.append(tr.last_eval)
    assert len(grads[0]) == len(grads[1]) == 3 and evals[0]["eval_kl"] > 0
    for k in grads[0][0]:  # the first step starts from the same weights: the same gradient
        torch.testing.assert_close(grads[0][0][k], grads[1][0][k], rtol=1e-5, atol=1e-8, msg=lambda m: f"{k}: {m}")
    for s in (1, 2):  # later steps from weights that may differ by float noise
        for k in grads[0][s]:
            torch.testing.assert_close(grads[0][s][k], grads[1][s][k], rtol=1e-3, atol=1e-5)
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-5)


def test_training_at_another_temperature_is_refused(tmp_path):
    from distill_pipe.trainer import DistillTrainer

    store, data = sparse_store(tmp_path, "sampled", {"draws": 8, "temperature": 2.0})
    c = TrainConfig(alpha=0.5, temperature=1.0, batch_size=2, max_steps=1)
    with pytest.raises(ConfigError, match="represents the teacher at temperature 2 only, not train.temperature=1"):
        DistillTrainer(tiny_model(), c, data, store=store, out_dir=tmp_path / "x", show_progress=False)
    # CE-only training never reads the store: no refusal
    DistillTrainer(tiny_model(), TrainConfig(alpha=1.0, temperature=1.0), data, store=store, out_dir=tmp_path / "y",
                   show_progress=False)


def test_teacher_stage_and_train_from_a_sampled_store_end_to_end(tmp_path, tiny_teacher, monkeypatch):
    """prepare -> teacher-logits (codec sampled, T=2) -> train a KD student from it; at another temperature the
    train command refuses with one `error:` line naming the fix, and writes nothing."""
    import yaml

    from conftest import assert_one_line_error, run_cli, write_project

    write_project(tmp_path, tiny_teacher, doc_chars=1500, seq_len=16,
                  teacher_logits={"codec": "sampled", "codec_params": {"draws": 8, "temperature": 2.0}, "shard_size": 8})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"].update(batch_size=2, max_steps=2, eval_steps=2, save_steps=2, warmup_steps=1, temperature=2.0,
                           max_eval_sequences=4, calibration_tokens=64)
    params["students"] = {"kd": {"init": {"config": {"num_hidden_layers": 1}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    for cmd in (["prepare"], ["teacher-logits"]):
        code, out = run_cli(*cmd)
        assert code == 0, out
    store = open_store(params["paths"]["logits"])
    assert store.codec.name == "sampled" and store.codec.temperature == 2.0 and store.verify() == []
    code, out = run_cli("train", "--student", "kd", "--set", "train.temperature=1.0")
    assert_one_line_error(code, out, "set train.temperature 2")
    assert not (tmp_path / params["paths"]["train"] / "kd").exists()
    code, out = run_cli("train", "--student", "kd")
    assert code == 0, out
    from distill_pipe.metrics import read_history

    rows = read_history(tmp_path / params["paths"]["dvclive"] / "kd", "train")
    # 2 steps; the kl column is the sampled store's unbiased KL estimate: finite and not 0 (a near-zero KL, as
    # between tiny random models here, can be estimated slightly below 0 by the draws)
    kl = float(rows[-1]["kl"])
    assert len(rows) == 2 and math.isfinite(kl) and kl != 0


def test_sampled_draws_follow_the_sequence_not_the_batch():
    """With row names (what the teacher stage passes) a sequence's draws depend on its name only: batching and
    the order in which shards are computed (resume, repair, ranks) leave the store unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 50) * 3
    names = [f"train/{i}" for i in range(4)]
    codec = make_codec("sampled", draws=16, temperature=2.0)
    whole = codec.encode(logits, rows=names)
    parts = [make_codec("sampled", draws=16, temperature=2.0).encode(logits[i:i + 1], rows=names[i:i + 1])
             for i in (3, 1, 0, 2)]
    for name in whole:
        again = torch.cat([parts[(3, 1, 0, 2).index(i)][name] for i in range(4)])
        assert torch.equal(whole[name], again), name
    other = codec.encode(logits, rows=[f"validation/{i}" for i in range(4)])
    assert not torch.equal(other["sample_ids"], whole["sample_ids"])  # another name, other draws
    with pytest.raises(ValueError, match="3 row names for 4 sequences"):
        codec.encode(logits, rows=names[:3])


def test_a_recomputed_sampled_shard_equals_the_original(project):
    """Shards recomputed in another order (as after a kill or a repair) hold the draws of the first run."""
    from conftest import run_cli
    from distill_pipe.config import load_config
    from distill_pipe.store.writer import clear_shard

    sets = ["--set", "teacher_logits.codec=sampled", "--set", "teacher_logits.codec_params={draws: 8}",
            "--set", "teacher_logits.shard_size=2", "--set", "teacher_logits.batch_size=2"]
    assert run_cli("prepare")[0] == 0
    code, out = run_cli("teacher-logits", *sets)
    assert code == 0, out
    path = load_config().paths.logits
    store = open_store(path)
    before = {n: store.array("train", n)[...] for n in store.payload_names}
    assert store.num_shards("train") >= 3
    rw = open_store(path, mode="r+")
    for k in (0, 2):  # the rerun computes shard 0 first, then 2: the first run drew 2 after 1
        clear_shard(rw, "train", k)
    code, out = run_cli("teacher-logits", *sets)
    assert code == 0, out
    after = open_store(path)
    assert after.completed_shards("train") == set(range(after.num_shards("train")))
    for n, a in before.items():
        np.testing.assert_array_equal(after.array("train", n)[...], a, err_msg=n)
