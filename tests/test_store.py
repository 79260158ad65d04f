"""Logit store: codec round trips against naive references, reader, writer, bad input.

Tiny dims: V=97 vocab, d=16 hidden, L=8 positions, N sequences.
"""

import json
import math
import shutil
import threading
import time
import uuid

import numpy as np
import pytest
import torch
import zarr

from distill_pipe.store import (FORMAT_VERSION, NotAStoreError, ShardWriter, StoreCorruptError, StoreError, StoreIncompleteError,
                                StoreVersionError, create_store, make_codec, open_store)
from distill_pipe.store.inspect import describe

V, D, L = 97, 16, 8
SOFTCAP, SCALE = 5.0, 0.7


def make_data(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_NLD = torch.randn(n, L, D, generator=g) * 2
    w_VD = torch.randn(V, D, generator=g)
    b_V = torch.randn(V, generator=g)
    ids = torch.randint(0, V, (n, L), generator=g).numpy().astype(np.int32)
    return h_NLD, w_VD, b_V, ids


def ref_logits(h, w, b=None, scale=None, softcap=None):
    """Naive fp32 teacher logits: h @ W.T + b, then scale, then soft-capping."""
    x = h.double() @ w.double().T
    if b is not None:
        x = x + b.double()
    if scale is not None:
        x = x * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x.float()


def build(path, codec, n=10, shard_size=4, write=None, head_kw=None, splits=None, seed=0):
    """A store of n train sequences (+3 validation); writes the shards listed in `write` (default all)."""
    h, w, b, ids = make_data(n, seed)
    codec = make_codec(codec) if isinstance(codec, str) else codec
    head = None
    if codec.name == "factored":
        head = {"weight": w, "bias": b, "final_logit_softcapping": SOFTCAP, "logit_scale": SCALE, **(head_kw or {})}
    store = create_store(path, attrs={"teacher": {"source": "test"}},
                         splits=splits or {"train": ids, "validation": ids[:3]}, codec=codec,
                         shard_size=shard_size, vocab_size=V, hidden_size=D, head=head)
    logits = ref_logits(h, w, b, SCALE, SOFTCAP) if head else ref_logits(h, w, b)
    x = h if codec.input_kind == "hidden" else logits
    shards = range(store.num_shards("train")) if write is None else write
    with ShardWriter(store, "train") as wr:
        for k in shards:
            a, z = store.shard_range("train", k)
            wr.submit(k, {name: t.cpu() for name, t in codec.encode(x[a:z]).items()})
    return store, logits, ids


def tv(logp, logq):
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


# ---- codec round trips ----------------------------------------------------------------------------

def test_dense_bf16_bit_exact(tmp_path):
    store, logits, _ = build(tmp_path / "s", "dense-bf16")
    store = open_store(tmp_path / "s")
    got = store.teacher_batch("train", list(range(10))).logits()
    want = logits.to(torch.bfloat16).float().reshape(-1, V)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_factored_matches_fp32_head_with_bias_scale_softcap(tmp_path):
    build(tmp_path / "s", "factored")
    store = open_store(tmp_path / "s")
    h, w, b, _ = make_data()
    assert store.head.final_logit_softcapping == SOFTCAP and store.head.logit_scale == SCALE
    got = store.teacher_batch("train", list(range(10))).logits()
    # exact up to fp16 rounding of h: compare with the reference on fp16-rounded h (tight) and on fp32 h (loose)
    exact = ref_logits(h.half().float(), w, b, SCALE, SOFTCAP).reshape(-1, V)
    torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-5)
    fp32 = ref_logits(h, w, b, SCALE, SOFTCAP).reshape(-1, V)
    assert (got - fp32).abs().max() < 0.05
    assert tv(torch.log_softmax(got, -1), torch.log_softmax(fp32, -1)).mean() < 1e-3


@pytest.mark.parametrize("params,tol", [({"hidden_dtype": "bf16"}, 0.02), ({"hidden_dtype": "int8"}, 0.02),
                                        ({"hidden_dtype": "int8", "rotate": True}, 0.02),
                                        ({"hidden_dtype": "int4", "group_size": 8}, 0.25)])
def test_factored_compact_hidden_dtypes(tmp_path, params, tol):
    codec = make_codec("factored", **params)
    build(tmp_path / "s", codec)
    store = open_store(tmp_path / "s")
    assert store.codec.params == codec.params
    h, w, b, _ = make_data()
    ref = torch.log_softmax(ref_logits(h, w, b, SCALE, SOFTCAP).reshape(-1, V), -1)
    got = torch.log_softmax(store.teacher_batch("train", list(range(10))).logits(), -1)
    assert tv(ref, got).mean() < tol
    # the dequantised hidden states equal a naive per-group symmetric quantiser's
    if params["hidden_dtype"] in ("int8", "int4"):
        hs = h @ codec.enc_DD if codec.rotate else h
        qmax = 127 if params["hidden_dtype"] == "int8" else 7
        g = params.get("group_size", D)
        hg = hs.reshape(10, L, D // g, g)
        scale = (hg.abs().amax(-1, keepdim=True) / qmax).half().float()
        naive = (torch.round(hg / scale).clamp(-qmax, qmax) * scale).reshape(-1, D)
        batch = store.teacher_batch("train", list(range(10)))
        torch.testing.assert_close(store.codec.dequantize(batch.payload), naive)


def test_factored_klt_int8_transform_coding(tmp_path):
    h, w, b, ids = make_data(n=40)
    codec = make_codec("factored", hidden_dtype="klt-int8", step=0.05)
    with pytest.raises(ValueError, match="calibrate"):
        codec.encode(h[:1])
    head = {"weight": w, "bias": b, "final_logit_softcapping": SOFTCAP, "logit_scale": SCALE}
    codec.calibrate(h[:20].reshape(-1, D), head)
    torch.testing.assert_close(codec.enc_DD @ codec.dec_DD, torch.eye(D), atol=1e-4, rtol=0)
    store = create_store(tmp_path / "s", attrs={}, splits={"train": ids}, codec=codec, shard_size=20,
                         vocab_size=V, hidden_size=D, head=head)
    with ShardWriter(store, "train") as wr:
        wr.submit(1, codec.encode(h[20:]))  # the held-out half
    store = open_store(tmp_path / "s")
    q = torch.round(h[20:].reshape(-1, D) @ codec.enc_DD).clamp(-127, 127)  # naive: grid in the transformed basis
    batch = store.teacher_batch("train", list(range(20, 40)))
    assert torch.equal(batch.payload["hidden"].float(), q)
    naive = ref_logits(q @ codec.dec_DD, w, b, SCALE, SOFTCAP)
    torch.testing.assert_close(batch.logits(), naive, atol=1e-4, rtol=1e-4)
    ref = torch.log_softmax(ref_logits(h[20:].reshape(-1, D), w, b, SCALE, SOFTCAP), -1)
    assert tv(ref, torch.log_softmax(batch.logits(), -1)).mean() < 0.02
    again = store.codec.encode(h[20:])["hidden"]  # the reopened store's codec encodes identically (resume)
    assert torch.equal(again.reshape(-1, D), batch.payload["hidden"])
    # a writer opens it without the (V, d) head: the codec still gets its transform, the head loads when used
    lazy = open_store(tmp_path / "s", mode="r+", load_head=False)
    assert lazy._head is None
    assert torch.equal(lazy.codec.encode(h[20:])["hidden"].reshape(-1, D), batch.payload["hidden"])
    assert torch.equal(lazy.teacher_batch("train", list(range(20, 40))).logits(), batch.logits())


def test_create_store_writes_a_bf16_head_as_float32_in_blocks(tmp_path):
    h, w, b, ids = make_data(n=4)
    w16 = w.to(torch.bfloat16)
    codec = make_codec("factored")
    store = create_store(tmp_path / "s", attrs={}, splits={"train": ids}, codec=codec, shard_size=4,
                         vocab_size=V, hidden_size=D, head={"weight": w16, "bias": b})
    assert store.head.weight_VD.dtype == torch.float32
    assert torch.equal(store.head.weight_VD, w16.float())  # bf16 -> fp32 is exact


def naive_u8(logits_PV, step, tail_mass, gamma, k):
    """Per-position numpy reference of the dense-u8 encoder (float64).

    Returns codes (P, V) uint8 before and after the tail is dropped, the overlay's ids (P, k) and fp16 values.
    """
    P, Vx = logits_PV.shape
    raw, codes = np.empty((P, Vx), np.uint8), np.empty((P, Vx), np.uint8)
    ids, vals = np.zeros((P, k), np.int64), np.zeros((P, k), np.float16)
    for i, row in enumerate(logits_PV.double().numpy()):
        lp = row - row.max() - math.log(np.exp(row - row.max()).sum())
        r = lp - lp.max()
        u = r
        if k:
            ids[i] = np.argsort(-r, kind="stable")[:k]
            vals[i] = r[ids[i]].astype(np.float16)
            origin = float(vals[i, -1]) if np.isfinite(vals[i, -1]) else 0.0
            u = np.minimum(r - origin, 0)
        code = np.clip(np.round((1 - np.exp(gamma * u)) / step) if gamma else np.round(-u / step), 0, 254)
        raw[i] = code
        # drop whole codes, least likely first, while the mass of all dropped codes stays below tail_mass
        first = 255
        while first > 0 and np.exp(lp[code >= first - 1]).sum() < tail_mass:
            first -= 1
        code[(code >= first) | np.isneginf(r)] = 255
        codes[i] = code
    return raw, codes, ids, vals


def peaked_logits(P, Vx, seed=0):
    """Zipf-like teacher rows: a few dominant tokens, a long tail (like a real LM's next-token distribution)."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.argsort(torch.rand(P, Vx, generator=g), -1).float()  # a random permutation of ranks per row
    return -1.1 * torch.log1p(rank) * (1 + 0.3 * torch.rand(P, 1, generator=g)) + 0.5 * torch.randn(P, Vx, generator=g)


@pytest.mark.parametrize("gamma,step,k", [(0.4, 1 / 255, 8), (0.2, 1 / 255, 0), (0.0, 1 / 16, 8)])
def test_dense_u8_against_naive_encoder(tmp_path, gamma, step, k):
    tail = 0.01
    codec = make_codec("dense-u8", step=step, tail_mass=tail, gamma=gamma, exact_top_k=k)
    _, logits, _ = build(tmp_path / "s", codec)
    store = open_store(tmp_path / "s")
    assert store.codec.params == codec.params
    flat = logits.reshape(-1, V)
    batch = store.teacher_batch("train", list(range(10)))
    codes = batch.payload["logprobs_u8"].numpy()
    raw, naive, ids, vals = naive_u8(flat, step, tail, gamma, k)
    assert np.array_equal(codes == 255, naive == 255)
    assert np.abs(codes.astype(int) - naive.astype(int)).max() <= 1  # float32 vs float64 rounding ties
    assert (codes != naive).mean() < 0.01
    if k:
        assert batch.payload["top_ids"].dtype == torch.uint16
        assert np.array_equal(np.sort(batch.payload["top_ids"].numpy().astype(int), -1), np.sort(ids, -1))
        assert np.array_equal(batch.payload["top_logprobs"].numpy(), vals)
    got = batch.logits()
    assert torch.isneginf(got).sum() == (codes == 255).sum() > 0  # the tail is -inf = probability 0
    assert (got.max(-1).values == 0).all() and (got.argmax(-1) == flat.argmax(-1)).all()
    ref = torch.log_softmax(flat, -1)
    dropped = torch.where(torch.from_numpy(codes == 255), ref.exp(), 0).sum(-1)
    assert (dropped < tail).all()
    # kept tokens off the overlay: error at most half a step of the grid (in nats), the grid starting at the
    # k-th largest r (fp16) with an overlay, at the max without
    r = ref - ref.max(-1, keepdim=True).values
    origin = torch.from_numpy(vals[:, -1:].astype(np.float32)) if k else torch.zeros(len(r), 1)
    on_grid = torch.from_numpy(codes < 254)
    if k:
        on_grid.scatter_(1, torch.from_numpy(ids), False)
    u = (r - origin)[on_grid]
    half_step = step / 2 if gamma == 0 else step / 2 / (gamma * torch.exp(gamma * u))
    assert ((got[on_grid] - r[on_grid]).abs() <= half_step * 1.01 + 1e-5).all()
    rounding = 0.5 * (math.exp(step / 2 if gamma == 0 else 0.05) - 1) * 2
    assert tv(ref, torch.log_softmax(got, -1)).max() <= tail + rounding


def test_dense_u8_histogram_tail_vs_sort_and_overlay_on_peaked_rows():
    Vx, tail, k = 3000, 2e-3, 16
    x = peaked_logits(64, Vx)
    lp = torch.log_softmax(x.double(), -1)
    p = lp.exp()
    codec = make_codec("dense-u8", tail_mass=tail, exact_top_k=k)
    pay = {n: t.reshape(64, -1) for n, t in codec.encode(x[None]).items()}
    codes = pay["logprobs_u8"].long()
    drop = codes == 255
    raw = torch.from_numpy(naive_u8(x, codec.step, tail, codec.gamma, k)[0]).long()  # codes before the tail
    for i in range(64):
        d = drop[i]
        assert p[i][d].sum() < tail  # the tail mass bound, per position
        kept_off_overlay = ~d
        kept_off_overlay[pay["top_ids"][i].long()] = False
        # whole bins: every dropped token sits in a code at least as unlikely as every kept token's code
        assert raw[i][d].min() > raw[i][kept_off_overlay].max()
        # and no more could go: the next bin up would cross tail_mass
        assert p[i][raw[i] >= raw[i][kept_off_overlay].max()].sum() >= tail
        # a sort drops a superset, differing only inside the boundary bin
        order = torch.argsort(lp[i])
        sort_drop = torch.zeros(Vx, dtype=torch.bool)
        sort_drop[order[torch.cumsum(p[i][order], 0) < tail]] = True
        assert not (d & ~sort_drop).any()
        assert (raw[i][sort_drop & ~d] == raw[i][~d].max()).all()
    # the overlay: the true top k, stored and decoded exactly (fp16 of r)
    r = (lp - lp.max(-1, keepdim=True).values).float()
    assert torch.equal(pay["top_ids"].long().sort(-1).values, torch.topk(r, k, -1).indices.sort(-1).values)
    got = codec.decode(pay, None)
    idx = pay["top_ids"].long()
    assert torch.equal(got.gather(1, idx), r.gather(1, idx).half().float())
    # accuracy on peaked rows: the overlay removes most of the rounding error of the likely tokens
    plain = make_codec("dense-u8", tail_mass=tail, exact_top_k=0)
    plain_pay = {n: t.reshape(64, -1) for n, t in plain.encode(x[None]).items()}
    tv_plain = tv(lp.float(), torch.log_softmax(plain.decode(plain_pay, None), -1))
    tv_overlay = tv(lp.float(), torch.log_softmax(got, -1))
    assert tv_overlay.mean() < 0.7 * tv_plain.mean() and tv_overlay.mean() < tail + 1e-3
    assert codec.check_payload({n: t.numpy() for n, t in pay.items()}) is None


def test_dense_u8_encode_is_sort_free_and_large_vocab_ids(monkeypatch):
    """Speed sanity, not timed: no per-position sort (O(V log V)); int32 ids once V > 65536."""
    Vx = 70000
    x = peaked_logits(3, Vx, seed=1)
    codec = make_codec("dense-u8", exact_top_k=4)
    assert codec.payload_specs(Vx, None)["top_ids"].dtype == np.int32

    def refuse(*a, **kw):
        raise AssertionError("dense-u8 encode sorted a whole row")

    monkeypatch.setattr(torch, "sort", refuse)
    monkeypatch.setattr(torch, "argsort", refuse)
    monkeypatch.setattr(torch.Tensor, "sort", refuse)
    monkeypatch.setattr(torch.Tensor, "argsort", refuse)
    pay = codec.encode(x[None])
    monkeypatch.undo()
    assert pay["top_ids"].dtype == torch.int32
    assert torch.equal(pay["top_ids"][0].long(), torch.topk(x, 4, -1).indices)  # ids above 65535 survive
    rec = codec.decode({n: t[0] for n, t in pay.items()}, None)
    r = x - x.max(-1, keepdim=True).values
    assert torch.equal(rec.gather(1, pay["top_ids"][0].long()), pay["top_logprobs"][0].float())
    assert (torch.where(torch.isneginf(rec), torch.softmax(x.double(), -1), 0).sum(-1) < codec.tail_mass).all()
    fine = pay["logprobs_u8"][0] < 200  # the companded grid's steps widen to ~1.7 nats at its far end
    assert fine.sum() > 100 and ((rec - r)[fine].abs() < 0.05).all()


def test_dense_u8_masked_vocab_and_bad_params():
    codec = make_codec("dense-u8", tail_mass=0.0)
    x = torch.randn(1, 2, V)
    x[..., 5] = -math.inf  # e.g. a padded vocab entry
    pay = codec.encode(x)
    codes = pay["logprobs_u8"]
    assert (codes[..., 5] == 255).all() and (codes != 255).sum() == 2 * (V - 1)
    assert not (pay["top_ids"] == 5).any()
    # fewer finite tokens than the overlay holds: the masked ones stay -inf, the rest exact
    y = torch.full((1, 1, V), -math.inf)
    y[..., :3] = torch.tensor([2.0, 1.0, 0.5])
    few = make_codec("dense-u8", exact_top_k=8)
    pay = few.encode(y)
    rec = few.decode({n: t[0] for n, t in pay.items()}, None)
    assert torch.equal(rec[0, :3], torch.tensor([0.0, -1.0, -1.5]))
    assert torch.isneginf(rec[0, 3:]).all()
    assert few.check_payload({n: t.numpy() for n, t in pay.items()}) is None
    for bad in (math.nan, math.inf):
        z = torch.randn(1, 2, V)
        z[0, 1, 3] = bad
        with pytest.raises(ValueError, match="NaN, \\+inf"):
            few.encode(z)
    assert make_codec("dense-u8").gamma == 0.4 and make_codec("dense-u8", exact_top_k=0).gamma == 0.2
    with pytest.raises(ValueError, match="tail_mass"):
        make_codec("dense-u8", tail_mass=0.7)
    with pytest.raises(ValueError, match="exact_top_k"):
        make_codec("dense-u8", exact_top_k=-1)
    with pytest.raises(ValueError, match="exact_top_k=200 exceeds the vocabulary size 97"):
        make_codec("dense-u8", exact_top_k=200).encode(torch.randn(1, 1, V))
    with pytest.raises(ValueError, match="unknown codec"):
        make_codec("top-k")
    with pytest.raises(ValueError, match="bad parameters"):
        make_codec("dense-bf16", step=3)


def test_dense_u8_check_payload_flags_bad_overlay():
    codec = make_codec("dense-u8", exact_top_k=4)
    good = {n: t.numpy() for n, t in codec.encode(torch.randn(1, 3, V)).items()}
    assert codec.check_payload(good) is None
    for name, edit, problem in [("logprobs_u8", lambda a: a.__setitem__((0, 1), 7), "without its max"),
                                ("top_ids", lambda a: a.__setitem__((0, 2, 1), V), "outside the vocabulary"),
                                ("top_logprobs", lambda a: a.__setitem__((0, 0, 0), -1.0), "descending"),
                                ("top_logprobs", lambda a: a.__setitem__((0, 0, 2), np.nan), "descending")]:
        bad = {n: a.copy() for n, a in good.items()}
        if name == "logprobs_u8":
            bad[name][0, 1] = np.maximum(bad[name][0, 1], 1)
        else:
            edit(bad[name])
        assert problem in codec.check_payload(bad)


def test_factored_refuses_nonfinite_and_fp16_overflow():
    codec = make_codec("factored")
    with pytest.raises(ValueError, match="NaN or inf"):
        codec.encode(torch.tensor([[[1.0, float("nan")]]]))
    with pytest.raises(ValueError, match="beyond fp16.*bf16"):
        codec.encode(torch.tensor([[[1.0, 1e5]]]))


def test_head_from_model_refuses_non_linear_head():
    from distill_pipe.store import head_from_model

    class Cfg:
        final_logit_softcapping = 30.0

    class M(torch.nn.Module):
        config = Cfg()

        def __init__(self, head):
            super().__init__()
            self.head = head

        def get_output_embeddings(self):
            return self.head

    got = head_from_model(M(torch.nn.Linear(D, V, bias=False)))
    assert got["weight"].shape == (V, D) and got["bias"] is None and got["final_logit_softcapping"] == 30.0
    with pytest.raises(StoreError, match="dense-u8 or dense-bf16"):
        head_from_model(M(torch.nn.Sequential(torch.nn.Linear(D, V))))


# ---- reader -----------------------------------------------------------------------------------------

def test_store_is_temperature_free(tmp_path):
    build(tmp_path / "s", "factored")
    store = open_store(tmp_path / "s")
    assert not any("temperature" in k for k in json.dumps(store.info).lower().split('"'))
    h, w, b, _ = make_data()
    ref = ref_logits(h, w, b, SCALE, SOFTCAP)[2]
    got = store.teacher_batch("train", [2]).logits()
    for T in (1.0, 2.0, 4.0):  # temperature applied by the consumer, same store
        assert tv(torch.log_softmax(ref / T, -1), torch.log_softmax(got / T, -1)).max() < 1e-3


@pytest.mark.parametrize("codec", ["factored", "dense-bf16", "dense-u8"])
def test_teacher_batch_consistent_with_logprobs_and_chunks(tmp_path, codec):
    build(tmp_path / "s", codec)
    store = open_store(tmp_path / "s")
    order = [7, 1, 7, 0, 9]  # any order, repeats, several shards
    batch = store.teacher_batch("train", order)
    assert batch.num_positions == len(order) * L
    whole = batch.logits()
    assert whole.dtype == torch.float32 and whole.shape == (len(order) * L, V)
    chunks = torch.cat([batch.logits(s, min(s + 7, batch.num_positions)) for s in range(0, batch.num_positions, 7)])
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)  # noqa: E731 (BLAS blocking)
    close(whole, chunks)
    for j, i in enumerate(order):
        lp = store.logprobs("train", i)
        assert lp.shape == (L, V) and lp.dtype == torch.float32
        close(torch.log_softmax(whole[j * L:(j + 1) * L], -1), lp)
    close(batch.to("cpu").logits(3, 11), whole[3:11])
    with pytest.raises(ValueError, match="outside"):
        batch.logits(0, batch.num_positions + 1)
    assert store.info["codec"]["name"] == codec and store.num_sequences("validation") == 3
    assert np.array_equal(store.input_ids("train")[:], make_data()[3])
    assert store.input_ids("train").dtype == np.int32


def test_memory_url_round_trip():
    url = f"memory://store-{uuid.uuid4().hex}"
    store, logits, ids = build(url, "dense-bf16")
    again = open_store(url)
    assert again.completed_shards("train") == {0, 1, 2}
    assert torch.equal(again.logprobs("train", 5), torch.log_softmax(logits[5].to(torch.bfloat16).float(), -1))
    assert np.array_equal(again.input_ids("train")[:], ids)
    report = describe(again, verify=True)
    assert "shards complete 3/3" in report and "B/token" in report and "verify      FAILED: 1" in report


def test_describe_reports_sizes_and_ratio(tmp_path):
    build(tmp_path / "s", "dense-u8", splits={"train": make_data()[3]})
    report = describe(open_store(tmp_path / "s"), verify=True)
    assert "dense-u8(" in report and "teacher     source=test" in report
    assert "train       10 sequences, 80 tokens, shards complete 3/3" in report
    assert "smaller than raw bf16 logits (194 B/token)" in report and "verify      ok" in report


# ---- writer -----------------------------------------------------------------------------------------

def test_completion_record_and_incomplete_split(tmp_path):
    store, _, _ = build(tmp_path / "s", "dense-u8", n=24, shard_size=2, write=[0, 1, 2, 6, 7, 8, 10])
    assert store.completed_shards("train") == {0, 1, 2, 6, 7, 8, 10}
    store = open_store(tmp_path / "s")
    assert store.completed_shards("train") == {0, 1, 2, 6, 7, 8, 10}
    assert store.shard_range("train", 11) == (22, 24) and store.num_shards("train") == 12
    with pytest.raises(StoreIncompleteError, match=r"train shards 3-5, 9, 11 of 12 missing; rerun "
                                                   r"`distill-pipe teacher-logits` to finish them"):
        store.check_complete("train")
    with pytest.raises(StoreIncompleteError, match="train shard 3 of 12 missing"):
        store.teacher_batch("train", [0, 7])
    store.teacher_batch("train", [0, 13, 21])  # complete shards read fine
    failures = store.verify("train")
    assert [k for _, k, _ in failures] == [3, 4, 5, 9, 11]


def test_writer_overlaps_and_bounds_queue(tmp_path, monkeypatch):
    import distill_pipe.store.writer as writer_mod

    store, _, _ = build(tmp_path / "s", "dense-bf16", n=16, shard_size=2, write=[])
    real = writer_mod.write_shard
    gate, threads = threading.Event(), set()

    def slow_write(*args):
        threads.add(threading.get_ident())
        gate.wait(5)
        real(*args)

    monkeypatch.setattr(writer_mod, "write_shard", slow_write)
    payload = make_codec("dense-bf16").encode(torch.randn(2, L, V))
    w = ShardWriter(store, "train", max_queue=1)
    t0 = time.perf_counter()
    w.submit(0, payload)  # taken by the thread, which blocks in the write
    time.sleep(0.05)
    w.submit(1, payload)  # waits in the queue
    assert time.perf_counter() - t0 < 1, "submit returned only after the write: no overlap"
    third = threading.Thread(target=w.submit, args=(2, payload))
    third.start()
    third.join(0.2)
    assert third.is_alive(), "a full queue must block submit (bounded memory)"
    gate.set()
    third.join(5)
    w.close()
    assert threads and threading.get_ident() not in threads
    assert open_store(tmp_path / "s").completed_shards("train") == {0, 1, 2}


def test_writer_error_surfaces(tmp_path):
    store, _, _ = build(tmp_path / "s", "dense-bf16", n=8, shard_size=2, write=[])
    good = make_codec("dense-bf16").encode(torch.randn(2, L, V))
    bad = {"logits_bf16": good["logits_bf16"][:, :3]}  # wrong shape: fails inside the thread
    w = ShardWriter(store, "train")
    w.submit(0, good)
    w.submit(1, bad)
    # a StoreError (a ValueError): the CLI's one line, naming the fix
    with pytest.raises(StoreError, match=r"writing train shards of .* failed \(ValueError: .*expected.*; check the "
                                         r"storage and rerun `distill-pipe teacher-logits`") as info:
        w.close()
    assert isinstance(info.value.__cause__, ValueError)
    assert open_store(tmp_path / "s").completed_shards("train") == {0}
    with pytest.raises(StoreError, match="writing train shards of .* failed"):
        with ShardWriter(store, "train") as w2:
            w2.submit(2, bad)
            time.sleep(0.2)
            w2.submit(3, good)  # the error surfaces at the next submit
    with pytest.raises(ValueError, match="shards 0..3, not 9"):
        ShardWriter(store, "train").submit(9, good)
    with pytest.raises(ValueError, match="read-only"):
        ShardWriter(open_store(tmp_path / "s"), "train")


def test_concurrent_writers_on_different_shards_lose_no_rows(tmp_path):
    n, shard_size, writers = 24, 2, 3
    store, logits, _ = build(tmp_path / "s", "dense-bf16", n=n, shard_size=shard_size, write=[])
    codec = make_codec("dense-bf16")

    def work(rank):
        s = open_store(tmp_path / "s", mode="r+")  # each writer its own handle, as separate processes would
        with ShardWriter(s, "train") as w:
            for k in range(rank, s.num_shards("train"), writers):  # interleaved: neighbours in other writers
                a, z = s.shard_range("train", k)
                w.submit(k, codec.encode(logits[a:z]))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(writers)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    store = open_store(tmp_path / "s")
    store.check_complete("train")
    got = store.teacher_batch("train", list(range(n))).logits()
    assert torch.equal(got, logits.to(torch.bfloat16).float().reshape(-1, V))


# ---- bad input --------------------------------------------------------------------------------------

def test_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="not a distill-pipe logit store"):
        open_store(tmp_path / "nothing-here")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file.txt").write_text("hi")
    with pytest.raises(NotAStoreError):
        open_store(tmp_path / "dir")
    zarr.open_group(str(tmp_path / "plain"), mode="w", attributes={"something": 1})
    with pytest.raises(NotAStoreError, match="interrupted creation"):
        open_store(tmp_path / "plain")
    zarr.create_array(str(tmp_path / "arr"), shape=(2,), dtype="int8")
    with pytest.raises(NotAStoreError):
        open_store(tmp_path / "arr")
    with pytest.raises(NotAStoreError):
        open_store(f"memory://missing-{uuid.uuid4().hex}")


def test_half_created_store_is_not_a_store(tmp_path, monkeypatch):
    import distill_pipe.store.writer as writer_mod

    monkeypatch.setattr(writer_mod, "_versions", lambda: 1 / 0)  # crash just before the attributes
    with pytest.raises(ZeroDivisionError):
        build(tmp_path / "s", "dense-u8")
    with pytest.raises(NotAStoreError):
        open_store(tmp_path / "s")


def test_existing_store_needs_overwrite(tmp_path):
    build(tmp_path / "s", "dense-u8", write=[])
    with pytest.raises(StoreError, match="already holds a store.*overwrite=True"):
        build(tmp_path / "s", "dense-u8", write=[])


def test_newer_format_version(tmp_path):
    build(tmp_path / "s", "dense-u8", write=[])
    newer = FORMAT_VERSION + 1
    zarr.open_group(str(tmp_path / "s"), mode="r+").attrs["format_version"] = newer
    with pytest.raises(StoreVersionError, match=f"format version {newer}.*reads up to {FORMAT_VERSION}: upgrade"):
        open_store(tmp_path / "s")


@pytest.mark.parametrize("how", ["garble", "truncate", "delete"])
def test_corrupted_shard_is_named_and_others_still_read(tmp_path, how):
    build(tmp_path / "s", "factored", n=12, shard_size=4)
    shard = tmp_path / "s" / "train" / "hidden" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if how == "garble":
        data[len(data) // 3: len(data) // 3 + 16] = b"\xff" * 16
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    store = open_store(tmp_path / "s")
    with pytest.raises(StoreCorruptError, match=r"train shard 1 is corrupt \(train/hidden/c/1/0/0"):
        store.teacher_batch("train", [0, 5])
    with pytest.raises(StoreCorruptError, match="train shard 1"):
        store.logprobs("train", 5)
    store.teacher_batch("train", [0, 3, 8, 11]).logits()  # shards 0 and 2 still read
    failures = store.verify("train")
    assert [(s, k) for s, k, _ in failures] == [("train", 1)] and "train/hidden/c/1/0/0" in failures[0][2]
    assert "train shard 1:" in describe(store, verify=True)


def test_payload_and_head_disagree(tmp_path):
    build(tmp_path / "s", "factored", write=[])
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    g["head"].create_array("weight", data=np.zeros((V, D + 1), np.float32), overwrite=True)
    with pytest.raises(StoreError, match=r"head/weight has shape \(97, 17\).*\(97, 16\)"):
        open_store(tmp_path / "s")
    h, w, b, ids = make_data()
    with pytest.raises(StoreError, match=r"head weight has shape \(97, 16\).*\(98, 16\)"):
        create_store(tmp_path / "t", attrs={}, splits={"train": ids}, codec=make_codec("factored"), shard_size=4,
                     vocab_size=V + 1, hidden_size=D, head={"weight": w})
    store = create_store(tmp_path / "u", attrs={}, splits={"train": ids}, codec="dense-u8", shard_size=4,
                         vocab_size=V, hidden_size=D)
    with pytest.raises(ValueError, match=r"logprobs_u8 is \(4, 8, 96\) uint8, expected \(4, 8, 97\)"):
        from distill_pipe.store import write_shard

        write_shard(store, "train", 0, make_codec("dense-u8").encode(torch.randn(4, L, V - 1)))


def test_manifest_only_of_a_complete_store_and_checked_by_readers(tmp_path):
    from distill_pipe.store.manifest import ManifestMismatchError, open_manifested_store, write_manifest

    ids = make_data(8)[3]
    store, _, _ = build(tmp_path / "s", "dense-u8", n=8, shard_size=2, splits={"train": ids})
    path = tmp_path / "dvc" / "manifest.json"
    store.array("train", "done")[2] = 0
    with pytest.raises(StoreIncompleteError, match="train shard 2 of 4 missing"):
        write_manifest(path, store)
    assert not path.parent.exists() or not any(path.parent.iterdir())  # nothing, not even a temp file
    store.array("train", "done")[2] = 1
    written = write_manifest(path, store)
    assert json.loads(path.read_text()) == written and [p.name for p in path.parent.iterdir()] == ["manifest.json"]
    assert written["store"] == str(tmp_path / "s") and written["complete"] is True
    assert written["splits"] == {"train": {"num_sequences": 8, "num_shards": 4, "shards_done": 4}}
    assert written["codec"]["name"] == "dense-u8" and written["teacher"] == {"source": "test"}
    before = path.read_bytes()
    write_manifest(path, open_store(tmp_path / "s"))  # no timestamps: the same store gives the same bytes
    assert path.read_bytes() == before

    assert open_manifested_store(str(tmp_path / "s"), path).num_sequences("train") == 8
    store.array("train", "done")[3] = 0  # damaged after the manifest was written
    with pytest.raises(StoreIncompleteError, match=f"train shard 3 of 4 missing, though {path} says it is "
                                                   "complete .*dvc repro --force --single-item teacher_logits"):
        open_manifested_store(str(tmp_path / "s"), path)
    with pytest.raises(StoreIncompleteError, match="missing; rerun"):  # a manifest of another location is ignored
        open_manifested_store(str(tmp_path / "s"), tmp_path / "none.json")
    store.array("train", "done")[3] = 1
    other = {**written, "codec": {"name": "dense-bf16", "params": {}}}
    path.write_text(json.dumps(other))
    with pytest.raises(ManifestMismatchError, match=f"differs from {path} in codec"):
        open_manifested_store(str(tmp_path / "s"), path)
    shutil.rmtree(tmp_path / "s")
    with pytest.raises(NotAStoreError, match=f"{tmp_path / 's'} is missing, though {path} says it is complete"):
        open_manifested_store(str(tmp_path / "s"), path)


def test_head_problems_name_each_part_that_is_not_the_teachers(tmp_path):
    """What `teacher-logits` compares on every resume of a factored store (and --repair rewrites): each part of the
    head that differs from the teacher's or cannot be read, by name; a store from before the head's `bias`
    attribute resumes as it is."""
    import json
    import shutil

    from distill_pipe.store import HeadCorruptError
    from distill_pipe.store.writer import rewrite_head

    build(tmp_path / "s", "factored")
    _, w, b, _ = make_data()
    teacher = {"weight": w.to(torch.bfloat16).float(), "bias": b, "final_logit_softcapping": SOFTCAP, "logit_scale": SCALE}
    exact = {**teacher, "weight": w}
    assert open_store(tmp_path / "s").head_problems(exact) == {}
    assert set(open_store(tmp_path / "s").head_problems(teacher)) == {"weight"}  # other values
    assert set(open_store(tmp_path / "s").head_problems({**exact, "bias": None})) == {"zarr.json", "bias"}
    meta = tmp_path / "s" / "head" / "zarr.json"
    old = json.loads(meta.read_text())
    del old["attributes"]["bias"]  # as a store written before the attribute
    meta.write_text(json.dumps(old))
    assert open_store(tmp_path / "s").head_problems(exact) == {}
    shutil.rmtree(tmp_path / "s" / "head" / "weight")
    with pytest.raises(HeadCorruptError, match=r"head \(head/weight\) is missing; .*teacher-logits --repair"):
        open_store(tmp_path / "s")
    store = open_store(tmp_path / "s", mode="r+", load_head=False, check_head=False)
    problems = store.head_problems(exact)
    assert problems == {"weight": "is missing"}
    rewrite_head(store, exact, problems)
    head = open_store(tmp_path / "s").head
    assert torch.equal(head.weight_VD, w) and torch.equal(head.bias_V, b) and head.logit_scale == SCALE


def test_truncated_input_ids_name_the_store_the_array_and_the_repair(tmp_path):
    """zarr alone says "Stored and computed checksum do not match"; what train and evaluate read through
    (token_rows) names the store, the array and `teacher-logits --repair`, and other chunks still read."""
    from distill_pipe.batches import read_rows

    store, _, ids = build(tmp_path / "s", "factored", n=12, shard_size=4)
    chunks = sorted(p for p in (tmp_path / "s" / "train" / "input_ids" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 3  # one chunk per shard
    chunks[1].write_bytes(chunks[1].read_bytes()[: chunks[1].stat().st_size // 2])
    store = open_store(tmp_path / "s")
    with pytest.raises(Exception, match="checksum") as raw:
        store.input_ids("train")[4:8]
    assert not isinstance(raw.value, StoreError)  # what the user saw before token_rows
    rows = store.token_rows("train")
    want = rf"{tmp_path / 's'}: array train/input_ids is unreadable .*`distill-pipe teacher-logits --repair`"
    with pytest.raises(StoreCorruptError, match=want):
        read_rows(rows, [9, 5])
    with pytest.raises(StoreCorruptError, match=want):
        rows[4:8]
    np.testing.assert_array_equal(read_rows(rows, [11, 0, 3]), ids[[11, 0, 3]])
    assert rows.shape == ids.shape and store.token_rows("train", mask=True) is None  # plain text: no mask
