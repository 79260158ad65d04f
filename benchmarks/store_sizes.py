"""Store sizes ON DISK per codec setting at V=49,152 and V=128,256, and headtail's (m, n) chosen by measurement.

    python benchmarks/store_sizes.py --out store_sizes_out          # long on 2 CPU cores: ~6 min per 512 tokens
    python benchmarks/store_sizes.py --tokens 512 --dense-tokens 256 --smol-tokens 512 --out /tmp/ss   # ~6 min, 2 cores

1. SmolLM2-135M (builtin:smollm2-135m, fp32) over --smol-tokens of the pydoc corpus: its mean entropy, top-1,
   top-8 and top-32 mass at T=1 (the reference distribution), and its own stores at V=49,152.
2. A tiny random Llama teacher built from config at each vocabulary (no download) whose head is
   logits = s * W h + b, b_v = -a log(rank_v) (a Zipf unigram prior over a random popularity order of the ids:
   no low-id advantage for zstd), with (a, s) fitted on a probe so that its mean entropy and top-1 mass match
   SmolLM2's; the comparison (entropy, top-1/8/32 mass) is printed.
3. Every setting's store is written through the real path (frontier.build_stores: create_store + encode +
   write_shard) over --tokens tokens (dense codecs over --dense-tokens: their size hardly depends on the count);
   B/token on disk = payload arrays only (bytes_under, no zarr.json, no factored head) / tokens, beside the
   format's uncompressed bytes (frontier.format_bytes; factored also at d=4096).
4. Variance: per position, sum_v Var(w_v) of the stored target (the forward-KL gradient's variance up to the
   factor ((1 - alpha) T)^2), closed form (M^2 - sum_tail p^2) / n for headtail and (1 - sum p^2) / n for
   sampled, on SmolLM2's own distributions at T=1; one empirical check of the closed form through the codec.
Writes store_sizes.md and store_sizes.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from frontier import build_stores, format_bytes  # noqa: E402

from distill_pipe import models  # noqa: E402
from distill_pipe.store import head_from_model, make_codec  # noqa: E402
from distill_pipe.store.inspect import bytes_under  # noqa: E402


def codecs_bench():
    """benchmarks/codecs.py (its name is the stdlib's `codecs`: loaded from its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("codecs_bench", REPO / "benchmarks" / "codecs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

L = 256  # sequence length
GRID_M, GRID_N = (4, 8, 12, 16), (4, 8, 16)
BUDGET = 64.0  # B/token on disk at V=128,256
FIXED = [("dense-bf16", "dense-bf16", {}), ("dense-u8", "dense-u8", {}), ("factored fp16", "factored", {}),
         ("topk k=32", "topk", {"k": 32}), ("topk k=128", "topk", {"k": 128}),
         ("sampled n=8", "sampled", {"draws": 8}), ("sampled n=16", "sampled", {"draws": 16}),
         ("sampled n=32", "sampled", {"draws": 32})]
HEADTAIL = [(f"headtail m={m} n={n}", "headtail", {"head": m, "draws": n}) for m in GRID_M for n in GRID_N]
DENSE = {"dense-bf16", "dense-u8", "factored"}


def dist_stats(logp_PV: torch.Tensor) -> dict:
    """Mean entropy (nats) and top-1/8/32 mass of log-probs (P, V), plus the sorted top-64 probs and sum p^2."""
    p = logp_PV.exp()
    top = p.topk(64, -1).values
    return {"entropy": float(-(p * logp_PV).nan_to_num(0.0).sum(-1).mean()),
            "top1": float(top[:, 0].mean()), "top8": float(top[:, :8].sum(-1).mean()),
            "top32": float(top[:, :32].sum(-1).mean()), "_top64": top.double(), "_sumsq": (p.double() ** 2).sum(-1)}


@torch.no_grad()
def logits_of(model, ids_NL: np.ndarray, batch: int = 2):
    for s in range(0, len(ids_NL), batch):
        yield model(input_ids=torch.as_tensor(ids_NL[s:s + batch], dtype=torch.long)).logits.float().flatten(0, 1)


def tiny_teacher(V: int, ref: dict, probe_ids: np.ndarray, seed: int = 0):
    """A 2-layer random Llama (d=64) whose head s * W h + b (b_v = -a log rank_v) matches ref's entropy and top-1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=L, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        h = model.get_decoder()(input_ids=torch.as_tensor(probe_ids, dtype=torch.long)).last_hidden_state.flatten(0, 1)
        wh = model.lm_head(h)
        wh = wh / wh.std()
    rank = torch.empty(V)
    rank[torch.randperm(V, generator=torch.Generator().manual_seed(seed))] = torch.arange(1, V + 1, dtype=torch.float32)
    zipf = -rank.log()

    def stats(a, s):
        return dist_stats((s * wh + a * zipf).log_softmax(-1))

    def fit_s(a):  # entropy falls as s grows (a fixed): bisect on log s
        lo, hi = -3.0, 3.0
        for _ in range(14):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if stats(a, math.exp(mid))["entropy"] > ref["entropy"] else (lo, mid)
        return math.exp((lo + hi) / 2)

    best = None
    for a in np.arange(0.6, 2.01, 0.2):
        s = fit_s(float(a))
        st = stats(float(a), s)
        err = abs(st["entropy"] - ref["entropy"]) + abs(st["top1"] - ref["top1"]) * 5
        if best is None or err < best[0]:
            best = (err, float(a), s, st)
    _, a, s, st = best
    with torch.no_grad():
        scale = s / float(model.lm_head(h).std())
    head = torch.nn.Linear(64, V, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * scale)
        head.bias.copy_(a * zipf)
    model.lm_head = head
    return model, {"a": a, "s": s, **st}


def metadata_bytes(store, sub: str) -> int:
    """Bytes of the zarr.json files under `sub` of a local store (metadata, not payload)."""
    top = os.path.join(store.location, sub)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(top) for f in files if f == "zarr.json")


def measure(teacher, ids: np.ndarray, dense_ids: np.ndarray, settings, work: Path) -> list[dict]:
    """B/token on disk (payload arrays only) and the format's uncompressed bytes of every setting's store."""
    head = head_from_model(teacher)
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    rows = []
    for group_ids, group in ((dense_ids, [s for s in settings if s[1] in DENSE]),
                             (ids, [s for s in settings if s[1] not in DENSE])):
        if not group:
            continue
        t0 = time.perf_counter()
        stores = build_stores(teacher, head, {"train": group_ids}, [(n, c, p, 0) for n, c, p in group],
                              work, shard_size=8, batch=2, device=torch.device("cpu"))
        for name, codec_name, params in group:
            store = stores[json.dumps([codec_name, params], sort_keys=True)]
            n_tok = group_ids.size
            parts = {p: (bytes_under(store, f"train/{p}") - metadata_bytes(store, f"train/{p}")) / n_tok
                     for p in store.payload_names}
            rows.append({"setting": name, "V": V, "d": d, "tokens": n_tok, "bytes_per_token": sum(parts.values()),
                         "parts": parts, "format_bytes": format_bytes(store.codec, d, V),
                         "format_bytes_d4096": format_bytes(store.codec, 4096, V)})
            print(f"    {name} V={V:,}: {rows[-1]['bytes_per_token']:.1f} B/token on disk, format "
                  f"{rows[-1]['format_bytes']:,}", flush=True)
        print(f"  V={V:,}: {len(group)} stores over {group_ids.size:,} tokens in {time.perf_counter() - t0:.0f} s",
              flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def variances(ref: dict) -> dict:
    """Mean over positions of sum_v Var(w_v): headtail (M^2 - sum_tail p^2)/n, sampled (1 - sum p^2)/n."""
    top, sumsq = ref["_top64"], ref["_sumsq"]
    out = {}
    for m in GRID_M:
        mass = 1 - top[:, :m].sum(-1)
        tail_sq = sumsq - (top[:, :m] ** 2).sum(-1)
        for n in GRID_N:
            out[f"headtail m={m} n={n}"] = float(((mass ** 2 - tail_sq) / n).mean())
    for n in (8, 16, 32):
        out[f"sampled n={n}"] = float(((1 - sumsq) / n).mean())
    return out


def empirical_variance(logits_PV: torch.Tensor, m: int, n: int, R: int = 64) -> float:
    """sum_v Var(w_v) over R independent headtail encodings of the same rows, mean over rows (float64)."""
    P, V = logits_PV.shape
    codec = make_codec("headtail", head=m, draws=n, seed=7)
    codec.payload_specs(V, None)
    x = logits_PV.unsqueeze(0).repeat(R, 1, 1)  # R "sequences" of the same P positions
    pay = {k: v.reshape(R * P, *v.shape[2:]) for k, v in codec.encode(x).items()}
    st = codec.sparse_targets(pay, 1.0)
    w = torch.zeros(R * P, V, dtype=torch.float64).scatter_add_(1, st.ids_CK.long(), st.probs_CK.double())
    return float(w.reshape(R, P, V).var(0).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per sparse store (multiple of 256)")
    ap.add_argument("--dense-tokens", type=int, default=1024, help="tokens per dense/factored store")
    ap.add_argument("--smol-tokens", type=int, default=2048, help="SmolLM2 tokens: reference stats, its stores")
    ap.add_argument("--no-smol-stores", action="store_true", help="SmolLM2's stats only, none of its stores")
    ap.add_argument("--out", default="store_sizes_out")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t_start = time.perf_counter()

    src = models.resolve("builtin:smollm2-135m")
    tok = models.load_tokenizer(src)
    n_all = max(args.tokens, args.smol_tokens)
    ids = np.asarray(codecs_bench().corpus_ids(tok, n_all), dtype=np.int64).reshape(-1, L)
    smol = models.load_causal_lm(src, dtype=torch.float32).eval()
    smol_ids = ids[:args.smol_tokens // L]
    logp = torch.cat([lg.log_softmax(-1) for lg in logits_of(smol, smol_ids)])
    ref = dist_stats(logp)
    print(f"SmolLM2-135M over {logp.shape[0]:,} pydoc tokens: entropy {ref['entropy']:.3f} nats, top-1 "
          f"{ref['top1']:.3f}, top-8 {ref['top8']:.3f}, top-32 {ref['top32']:.3f}", flush=True)
    check_rows = logp[torch.linspace(0, logp.shape[0] - 1, 48).long()]

    rows = [] if args.no_smol_stores else measure(smol, smol_ids, smol_ids[:max(1, args.dense_tokens // L)],
                                                  [s for s in FIXED + HEADTAIL if s[1] not in DENSE], work)
    del smol
    for r in rows:
        r["teacher"] = "SmolLM2-135M"
    comparison = [{"teacher": "SmolLM2-135M", **{k: v for k, v in ref.items() if not k.startswith("_")}}]
    for V in (49_152, 128_256):
        teacher, fit = tiny_teacher(V, ref, ids[:1, :96])
        comparison.append({"teacher": f"tiny Llama V={V:,}", **{k: v for k, v in fit.items() if not k.startswith("_")}})
        print(f"tiny Llama V={V:,} (a={fit['a']:.1f}, s={fit['s']:.3f}): entropy {fit['entropy']:.3f}, top-1 "
              f"{fit['top1']:.3f}, top-8 {fit['top8']:.3f}, top-32 {fit['top32']:.3f}", flush=True)
        for r in measure(teacher, ids[:args.tokens // L], ids[:max(1, args.dense_tokens // L)], FIXED + HEADTAIL, work):
            rows.append({"teacher": f"tiny Llama V={V:,}", **r})
        del teacher

    var = variances(ref)
    size_at = {r["setting"]: r["bytes_per_token"] for r in rows if r["V"] == 128_256}
    size_49 = {r["setting"]: r["bytes_per_token"] for r in rows if r["teacher"] == "tiny Llama V=49,152"}
    size_smol = {r["setting"]: r["bytes_per_token"] for r in rows if r["teacher"] == "SmolLM2-135M"}
    within = {k: v for k, v in var.items() if k.startswith("headtail") and size_at[k] <= BUDGET}
    chosen = min(within, key=within.get) if within else None
    emp = None
    if chosen:
        m, n = (int(x.split("=")[1]) for x in chosen.split()[1:])
        emp = empirical_variance(check_rows, m, n)

    lines = [f"Store sizes on disk ({args.tokens:,} tokens per sparse store, {args.dense_tokens:,} per dense one; "
             f"SmolLM2 stores over {args.smol_tokens:,}); {(time.perf_counter() - t_start) / 60:.1f} min",
             "", "| teacher | entropy (nats) | top-1 | top-8 | top-32 |", "|---|---|---|---|---|"]
    lines += [f"| {c['teacher']} | {c['entropy']:.3f} | {c['top1']:.3f} | {c['top8']:.3f} | {c['top32']:.3f} |"
              for c in comparison]
    lines += ["", "| setting | SmolLM2 V=49,152 disk | tiny V=49,152 disk | format V=49,152 | tiny V=128,256 disk | "
                  "format V=128,256 | format d=4096, V=128,256 |", "|---|---|---|---|---|---|---|"]
    fmt = {(r["setting"], r["V"]): r for r in rows if r["teacher"] != "SmolLM2-135M"}
    for name, _, _ in FIXED + HEADTAIL:
        a, b = fmt[(name, 49_152)], fmt[(name, 128_256)]
        sm = f"{size_smol[name]:,.1f}" if name in size_smol else "-"  # dense: not stored for SmolLM2
        lines.append(f"| {name} | {sm} | {a['bytes_per_token']:,.1f} | {a['format_bytes']:,} | "
                     f"{b['bytes_per_token']:,.1f} | {b['format_bytes']:,} | {b['format_bytes_d4096']:,} |")
    lines += ["", f"factored fp16 is measured at the tiny teacher's d={rows[-1]['d']}; its size is 2d B/token.",
              "", "| setting | sum_v Var(w_v) on SmolLM2, T=1 | disk V=128,256 | disk V=49,152 (tiny) | "
                  f"within {BUDGET:g} B |", "|---|---|---|---|---|"]
    for k in sorted(var, key=var.get):
        lines.append(f"| {k} | {var[k]:.4f} | {size_at[k]:.1f} | {size_49[k]:.1f} | "
                     f"{'yes' if size_at[k] <= BUDGET else 'no'} |")
    if chosen:
        lines += ["", f"chosen: {chosen}: variance {var[chosen]:.4f} (empirical through the codec, 64 encodings x 48 "
                      f"SmolLM2 rows: {emp:.4f}), {size_at[chosen]:.1f} B/token on disk at V=128,256, "
                      f"{size_49[chosen]:.1f} at V=49,152 (tiny), {size_smol.get(chosen, math.nan):.1f} on SmolLM2's own store"]
    report = "\n".join(lines) + "\n"
    (out / "store_sizes.md").write_text(report)
    (out / "store_sizes.json").write_text(json.dumps({"comparison": comparison, "rows": rows, "variance": var,
                                                      "chosen": chosen, "empirical_variance": emp}, indent=2) + "\n")
    print(report)


if __name__ == "__main__":
    main()
