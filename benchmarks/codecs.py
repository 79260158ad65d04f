"""Codec benchmark: bytes/token and error of each logit-store codec against the fp32 teacher.

    python benchmarks/codecs.py                      # 8 x 256 positions of the builtin corpus (~8 min, 2 cores)
    python benchmarks/codecs.py --sequences 4 --quick
    python benchmarks/codecs.py --codecs dense-u8     # only that codec's rows (also: factored, dense-bf16, top-k)
    python benchmarks/codecs.py --codecs dense-u8 --quick --corpus python-source --temps 0.5,1,1.5,2

Teacher: builtin:smollm2-135m in fp32. Corpus (--corpus): `pydoc`, CPython's pydoc topics joined with EOS (the
demo's); `python-source`, this Python's standard-library modules (Lib/*.py, sorted by name); or a text file.
The header line gives the teacher's mean entropy at T=1 over the positions, which sets dense-u8's size. For every codec setting
the payload really goes through a zarr store on local disk (create_store + ShardWriter), and is read back
with open_store/teacher_batch. Columns:
  B/token    payload bytes on disk / tokens (the factored head is stored once: reported below the table)
  x bf16     raw bf16 logits (2 V bytes/token) / B/token
  TV@T       mean over positions of 1/2 sum |p_T - q_T|, p_T = softmax(teacher fp32 logits / T)
  KL(t||r)   mean KL(teacher || reconstruction) at T: infinite when the reconstruction drops tokens (-inf)
  KL(r||t)   mean KL(reconstruction || teacher) at T: finite for truncating codecs too
  kept       mean number of tokens per position with non-zero probability in the reconstruction
  enc, dec   MB/s of raw bf16 logits equivalent (2 V bytes/token): encode = codec.encode + compress + write;
             decode = read + decompress + fp32 logits for every position
Top-k rows (DistillKit-style: keep the k largest probabilities, renormalise) store token ids (uint16) and fp16
log-probs, blosc-zstd with byte shuffle.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402
from zarr.codecs import BloscCodec  # noqa: E402

from distill_pipe.store import Head, ShardWriter, create_store, head_from_model, make_codec, open_store  # noqa: E402
from distill_pipe.store.inspect import bytes_under  # noqa: E402

TEMPS = [1.0, 2.0, 4.0]  # --temps replaces it; T=1 always included (the entropy)


def corpus_text(corpus: str, eos: str) -> str:
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return eos.join(topics[k] for k in sorted(topics))
    if corpus == "python-source":
        import glob
        import sysconfig

        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        return eos.join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    with open(corpus, encoding="utf-8", errors="replace") as f:
        return f.read()


def corpus_ids(tok, n_tokens: int, corpus: str = "pydoc") -> list[int]:
    text = corpus_text(corpus, tok.eos_token)
    ids = tok(text[:40 * n_tokens])["input_ids"]  # a token is well under 40 characters: no need for the rest
    if len(ids) < n_tokens:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return ids[:n_tokens]


@torch.no_grad()
def teacher_hidden(model, ids_NL: torch.Tensor, batch: int) -> torch.Tensor:
    out = [model.model(input_ids=ids_NL[i:i + batch]).last_hidden_state for i in range(0, len(ids_NL), batch)]
    return torch.cat(out)  # (N, L, d) fp32, after the final norm


class Reference:
    """The fp32 teacher's log-probs at each temperature, computed once for all codecs: (P, V) per T."""

    def __init__(self, h_PD: torch.Tensor, head: Head, chunk: int):
        self.lp = {T: torch.empty(h_PD.shape[0], head.vocab_size) for T in TEMPS}
        for s in range(0, h_PD.shape[0], chunk):
            logits = head.logits(h_PD[s:s + chunk])
            for T in TEMPS:
                self.lp[T][s:s + chunk] = torch.log_softmax(logits / T, -1)


class Metrics:
    """Accumulates TV and both KLs per temperature over position chunks."""

    def __init__(self, ref: Reference):
        self.ref = ref
        self.sums = {(m, T): 0.0 for m in ("tv", "kl_tr", "kl_rt") for T in TEMPS}
        self.kept = 0
        self.n = 0

    def add(self, start: int, rec_PV: torch.Tensor) -> None:
        """Reconstructed logits of global flattened positions [start, start + len(rec_PV))."""
        for T in TEMPS:
            lp = self.ref.lp[T][start:start + rec_PV.shape[0]]
            lq = torch.log_softmax(rec_PV / T, -1)
            p, q = lp.exp(), lq.exp()
            self.sums["tv", T] += 0.5 * (p - q).abs().sum(-1).sum().item()
            self.sums["kl_tr", T] += torch.where(p > 0, p * (lp - lq), 0.0).sum(-1).sum().item()  # inf: q = 0 < p
            self.sums["kl_rt", T] += torch.where(q > 0, q * (lq - lp), 0.0).sum(-1).sum().item()
        self.kept += int(torch.isfinite(rec_PV).sum())
        self.n += rec_PV.shape[0]

    def mean(self, m: str, T: float) -> float:
        return self.sums[m, T] / self.n


def ref_logits(h_PD, head: Head) -> torch.Tensor:
    return head.logits(h_PD)


def run_codec(name, params, h_NLD, head_dict, calib_PD, root, shard_size, chunk, ref):
    N, L, d = h_NLD.shape
    head = Head(head_dict["weight"], head_dict["bias"], head_dict["final_logit_softcapping"],
                head_dict["logit_scale"])
    V = head.vocab_size
    codec = make_codec(name, **params)
    if hasattr(codec, "calibrate"):
        codec.calibrate(calib_PD, head_dict)
    path = os.path.join(root, f"{name}-{abs(hash(str(params)))}")
    ids = np.zeros((N, L), np.int32)
    store = create_store(path, attrs={}, splits={"train": ids}, codec=codec, shard_size=shard_size, vocab_size=V,
                         hidden_size=d, head=head_dict if name == "factored" else None)
    t_enc = 0.0
    with ShardWriter(store, "train") as w:
        for k in range(store.num_shards("train")):
            a, z = store.shard_range("train", k)
            x = h_NLD[a:z] if codec.input_kind == "hidden" else ref_logits(h_NLD[a:z].reshape(-1, d), head).reshape(
                z - a, L, V)
            t0 = time.perf_counter()
            w.submit(k, {n: t.cpu() for n, t in codec.encode(x).items()})
            t_enc += time.perf_counter() - t0
            del x
        t0 = time.perf_counter()
    t_enc += time.perf_counter() - t0  # waiting for the last writes
    payload_bytes = sum(bytes_under(store, f"train/{n}") for n in store.payload_names)
    head_bytes = bytes_under(store, "head") if name == "factored" else 0

    store = open_store(path)
    metrics, t_dec = Metrics(ref), 0.0
    for k in range(store.num_shards("train")):
        a, z = store.shard_range("train", k)
        t0 = time.perf_counter()
        batch = store.teacher_batch("train", list(range(a, z)))
        t_dec += time.perf_counter() - t0
        for s in range(0, batch.num_positions, chunk):
            t0 = time.perf_counter()
            rec = batch.logits(s, min(s + chunk, batch.num_positions))
            t_dec += time.perf_counter() - t0
            metrics.add(a * L + s, rec)
    return payload_bytes, head_bytes, metrics, t_enc, t_dec


def run_topk(k_top, h_NLD, head, root, shard_size, chunk, ref):
    """DistillKit-style top-k: ids + fp16 log-probs of the k most likely tokens, renormalised on read."""
    N, L, d = h_NLD.shape
    V = head.vocab_size
    g = zarr.open_group(os.path.join(root, f"top{k_top}"), mode="w")
    comp = [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)]
    kw = dict(chunks=(1, L, k_top), shards=(shard_size, L, k_top), compressors=comp, fill_value=0)
    ids_a = g.create_array("ids", shape=(N, L, k_top), dtype=np.uint16, **kw)
    lp_a = g.create_array("logprobs", shape=(N, L, k_top), dtype=np.float16, **kw)
    t_enc = 0.0
    for a in range(0, N, shard_size):
        z = min(N, a + shard_size)
        logits = ref_logits(h_NLD[a:z].reshape(-1, d), head)
        t0 = time.perf_counter()
        top = torch.topk(torch.log_softmax(logits, -1), k_top, -1)
        ids_a[a:z] = top.indices.to(torch.int32).numpy().astype(np.uint16).reshape(z - a, L, k_top)
        lp_a[a:z] = top.values.half().numpy().reshape(z - a, L, k_top)
        t_enc += time.perf_counter() - t0
    nbytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(os.path.join(root, f"top{k_top}"))
                 for f in fs if f != "zarr.json")
    metrics, t_dec = Metrics(ref), 0.0
    for a in range(0, N, shard_size):
        z = min(N, a + shard_size)
        t0 = time.perf_counter()
        ids = torch.from_numpy(ids_a[a:z].astype(np.int64)).reshape(-1, k_top)
        vals = torch.from_numpy(lp_a[a:z]).float().reshape(-1, k_top)
        t_dec += time.perf_counter() - t0
        for s in range(0, ids.shape[0], chunk):
            t0 = time.perf_counter()
            rec = torch.full((min(chunk, ids.shape[0] - s), V), -math.inf).scatter_(-1, ids[s:s + chunk],
                                                                                     vals[s:s + chunk])
            t_dec += time.perf_counter() - t0
            metrics.add(a * L + s, rec)
    return nbytes, metrics, t_enc, t_dec


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=8, help="sequences evaluated (positions = sequences x seq-len)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-sequences", type=int, default=2,
                    help="held-out sequences (after the evaluated ones) that fit the klt-int8 transform")
    ap.add_argument("--batch", type=int, default=4, help="teacher forward batch")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=512, help="positions decoded at a time")
    ap.add_argument("--quick", action="store_true", help="only the default setting of each codec")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--codecs", default="factored,dense-bf16,dense-u8,top-k",
                    help="comma-separated rows to run: factored, dense-bf16, dense-u8, top-k")
    ap.add_argument("--corpus", default="pydoc", help="pydoc (default), python-source, or a path to a text file")
    ap.add_argument("--temps", default="1,2,4", help="comma-separated temperatures of the TV / KL columns")
    ap.add_argument("--settings", default=None,
                    help="the codec rows instead of the built-in list, ';'-separated, e.g. "
                         "'dense-u8;dense-u8:tail_mass=3e-3,exact_top_k=0' (values are read as numbers when they are)")
    args = ap.parse_args()
    TEMPS[:] = sorted({1.0, *(float(t) for t in args.temps.split(","))})
    wanted = set(args.codecs.split(","))
    unknown = wanted - {"factored", "dense-bf16", "dense-u8", "top-k"}
    if unknown:
        ap.error(f"--codecs: unknown {sorted(unknown)}; choose from factored, dense-bf16, dense-u8, top-k")
    torch.set_num_threads(os.cpu_count() or 1)

    from distill_pipe.models import load_causal_lm, load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer("builtin:smollm2-135m")
    model = load_causal_lm("builtin:smollm2-135m", dtype=torch.float32).eval()
    n_all = args.sequences + (args.calib_sequences if "factored" in wanted else 0)
    ids = torch.tensor(corpus_ids(tok, n_all * args.seq_len, args.corpus)).view(n_all, args.seq_len)
    h_all = teacher_hidden(model, ids, args.batch)
    head_dict = head_from_model(model)
    del model
    h_NLD, calib_PD = h_all[:args.sequences], h_all[args.sequences:].reshape(-1, h_all.shape[-1])
    N, L, d = h_NLD.shape
    V = head_dict["weight"].shape[0]
    head = Head(head_dict["weight"], head_dict["bias"], head_dict["final_logit_softcapping"],
                head_dict["logit_scale"])
    print(f"teacher builtin:smollm2-135m fp32 (V={V}, d={d}); {N * L} positions ({N} x {L}) of corpus "
          f"{args.corpus}; setup {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}", flush=True)

    settings = [("factored", {}), ("dense-bf16", {}), ("dense-u8", {})]
    if not args.quick:
        settings = [
            ("factored", {}), ("factored", {"hidden_dtype": "bf16"}), ("factored", {"hidden_dtype": "int8"}),
            ("factored", {"hidden_dtype": "int8", "rotate": True}),
            ("factored", {"hidden_dtype": "int4", "group_size": 32, "rotate": True}),
            ("factored", {"hidden_dtype": "klt-int8", "step": 0.15}),
            ("factored", {"hidden_dtype": "klt-int8", "step": 0.2}),
            ("dense-bf16", {}),
            ("dense-u8", {}), ("dense-u8", {"zstd_level": 3}),
            ("dense-u8", {"exact_top_k": 0}),  # the defaults before the exact overlay (gamma 0.2)
            ("dense-u8", {"exact_top_k": 0, "gamma": 0.4}), ("dense-u8", {"gamma": 0.2}),
            ("dense-u8", {"exact_top_k": 64}), ("dense-u8", {"tail_mass": 7e-4}),
            ("dense-u8", {"gamma": 0.0, "step": 1 / 16, "tail_mass": 1e-3}),
            ("dense-u8", {"gamma": 0.0, "step": 1 / 16, "tail_mass": 1e-2}),
        ]
    if args.settings:
        settings = []
        for row in args.settings.split(";"):
            name, _, kv = row.partition(":")
            params = dict(item.split("=", 1) for item in kv.split(",")) if kv else {}
            settings.append((name, {k: _number(v) for k, v in params.items()}))
    settings = [(name, params) for name, params in settings if name in wanted]
    raw = 2 * V
    mb = N * L * raw / 1e6
    header = "| codec | params | B/token | x bf16 | " + " | ".join(
        f"{m}@{T:g}" for m in ("TV", "KL(t‖r)", "KL(r‖t)") for T in TEMPS) + " | kept | enc MB/s | dec MB/s |"
    rows, head_bytes = [], 0

    def row(name, params, nbytes, m, t_enc, t_dec):
        bpt = nbytes / (N * L)
        cells = [name, params, f"{bpt:,.0f}", f"{raw / bpt:,.1f}"]
        cells += [f"{m.mean('tv', T):.2g}" for T in TEMPS]
        cells += [f"{m.mean('kl_tr', T):.2g}" for T in TEMPS]
        cells += [f"{m.mean('kl_rt', T):.2g}" for T in TEMPS]
        cells += [f"{m.kept / m.n:,.0f}", f"{mb / t_enc:,.0f}", f"{mb / t_dec:,.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        ref = Reference(h_NLD.reshape(-1, d), head, args.chunk)
        lp1 = ref.lp[1.0]
        entropy = -(lp1.exp() * lp1).nan_to_num_(0.0).sum(-1)  # (P,) nats at T=1
        tgt = ids[:N, 1:].reshape(-1)
        ce = -lp1.view(N, L, V)[:, :-1].reshape(-1, V).gather(1, tgt[:, None]).mean().item()
        # tokens needed to hold 1 - 1e-3 of the mass (dense-u8's default tail_mass): what sets dense-u8's size
        support = torch.cat([(lp1[s:s + args.chunk].exp().sort(-1, descending=True).values.cumsum(-1) < 1 - 1e-3)
                             .sum(-1) + 1 for s in range(0, N * L, args.chunk)]).float()
        print(f"teacher at T=1 on these positions: mean entropy {entropy.mean():.2f} nats (median "
              f"{entropy.median():.2f}, mean exp(entropy) {entropy.exp().mean():.0f} tokens), perplexity "
              f"{math.exp(ce):.1f}; tokens holding 99.9% of the mass: mean {support.mean():,.0f}, median "
              f"{support.median():,.0f}", flush=True)
        print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
        for name, params in settings:
            nbytes, hb, m, te, td = run_codec(name, params, h_NLD, head_dict, calib_PD, root, args.shard_size,
                                              args.chunk, ref)
            head_bytes = max(head_bytes, hb)
            row(name, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
                or "default", nbytes, m, te, td)
        for k_top in (32, 128) if "top-k" in wanted else ():
            nbytes, m, te, td = run_topk(k_top, h_NLD, head, root, args.shard_size, args.chunk, ref)
            row(f"top-{k_top}", "ids u16 + fp16 logprobs", nbytes, m, te, td)
    head_note = f"factored head (stored once per store): {head_bytes / 1e6:.1f} MB on disk; " if head_bytes else ""
    print(f"\n{head_note}raw bf16 logits = {raw:,} B/token; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
