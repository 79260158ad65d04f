"""The student-quality frontier of the store codecs: one KD student per codec setting, same init, data, steps and
seed; its validation perplexity, KL to the teacher and top-1 agreement against the bytes/token its store costs.

    python benchmarks/frontier.py --device cuda --out frontier_out                # the demo's setting, ~5 min on an H100
    python benchmarks/frontier.py --device cuda --teacher /path/to/SmolLM2-135M-Instruct.gguf --out frontier_out
    python benchmarks/frontier.py --max-steps 2 --tokens small --out /tmp/frontier   # a smoke test on CPU

The setting is the demo's (params.yaml): data (builtin pydoc corpus, 16,384 train / 4,096 validation tokens of
seq_len 256), student kd20 (the builtin teacher's 30 layers greedily dropped to 20, on the same calibration
tokens as the train stage), its alpha, T, learning rate, batch, epochs/steps and seed. Per codec setting:
  1. the fp32 teacher's outputs over both splits are encoded into a store of that codec (the real
     create_store / write_shard / open_store path), on --device;
  2. a copy of the same initial student trains with the real DistillTrainer from that store (no checkpoints);
  3. the final student is scored on the validation split against the fp32 teacher itself (not the store):
     perplexity, KL(teacher || student) at T=1, top-1 agreement.
The reference is dense-bf16; it is trained twice (seeds 0 and 1: data order) to show run-to-run noise.
A setting the trainer refuses (e.g. a store that cannot represent T) is reported as refused, with the reason.

target TV@T: mean total variation between the fp32 teacher at the training T and the store's reconstruction at
T on the validation split (sampled: the draws' empirical distribution, which is unbiased, not close).
bytes/token measured: the store's payload bytes on disk (compressed; the factored head, stored once, excluded)
over its tokens. bytes/token at (d, V): the format's uncompressed payload size for a teacher with hidden size d
and vocabulary V (ids are uint16 up to V = 65,536, int32 beyond): what the format guarantees before zstd.
Writes frontier.md (the table), frontier.json and frontier.png (perplexity against bytes/token, log x) to --out
and prints the table at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
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

from distill_pipe import models  # noqa: E402
from distill_pipe.config import ConfigError, load_config  # noqa: E402
from distill_pipe.distributed import DistInfo  # noqa: E402
from distill_pipe.store import Head, create_store, head_from_model, make_codec, open_store  # noqa: E402
from distill_pipe.store.inspect import bytes_under  # noqa: E402
from distill_pipe.store.writer import write_shard  # noqa: E402
from distill_pipe.trainer import DistillTrainer  # noqa: E402

log = logging.getLogger("frontier")

# (setting name, codec, codec params, seed). Sparse codecs are stored at the training temperature, filled in
# from the config ("T").
SETTINGS = [
    ("dense-bf16", "dense-bf16", {}, 0),
    ("dense-bf16 seed 1", "dense-bf16", {}, 1),
    ("factored fp16", "factored", {}, 0),
    ("factored klt-int8", "factored", {"hidden_dtype": "klt-int8", "step": 0.2}, 0),
    ("dense-u8", "dense-u8", {}, 0),
    ("topk k=32", "topk", {"k": 32, "temperature": "T"}, 0),
    ("topk k=128", "topk", {"k": 128, "temperature": "T"}, 0),
    ("sampled n=8", "sampled", {"draws": 8, "temperature": "T"}, 0),
    ("sampled n=16", "sampled", {"draws": 16, "temperature": "T"}, 0),
    ("sampled n=32", "sampled", {"draws": 32, "temperature": "T"}, 0),
    ("sampled n=64", "sampled", {"draws": 64, "temperature": "T"}, 0),
]
REFERENCE = "dense-bf16"
SHAPES = [(4096, 128_256), (8192, 128_256)]  # (d, V): Llama-3-8B and -70B class teachers


def format_bytes(codec, d: int, V: int) -> int:
    """Uncompressed payload bytes per token of `codec` for a teacher with hidden size d and vocabulary V."""
    specs = make_codec(codec.name, **codec.params).payload_specs(V, d)  # a copy: the store's codec keeps its V
    return sum(int(np.prod(s.trailing)) * s.dtype.itemsize for s in specs.values())


class NoCheckpoints(DistillTrainer):
    """The frontier keeps only the final weights: a checkpoint of this student is 1.2 GB."""

    def save_checkpoint(self):
        return None


@torch.no_grad()
def teacher_pass(teacher, ids_NL: np.ndarray, batch: int, device):
    """Yields (first row, final hidden states (b, L, d), logits (b, L, V)) per batch, fp32 on `device`."""
    for s in range(0, len(ids_NL), batch):
        ids = torch.as_tensor(ids_NL[s:s + batch], dtype=torch.long, device=device)
        h = teacher.get_decoder()(input_ids=ids).last_hidden_state
        yield s, h, teacher.get_output_embeddings()(h)


def build_stores(teacher, head: dict, splits: dict, settings, work: Path, shard_size: int, batch: int,
                 device) -> dict:
    """One store per distinct (codec, params), written from a single teacher pass per shard."""
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    codecs = {}
    for name, codec_name, params, _ in settings:
        key = json.dumps([codec_name, params], sort_keys=True)
        if key not in codecs:
            codecs[key] = (name, make_codec(codec_name, **params))
    # klt-int8 fits its transform on two training sequences' hidden states, as the teacher stage does
    probe = next(teacher_pass(teacher, splits["train"][:2], 2, device))[1].float().flatten(0, 1).cpu()
    stores = {}
    for key, (name, codec) in codecs.items():
        if codec.name == "factored":
            codec.calibrate(probe, head)
        path = work / f"{len(stores):02d}-{codec.name}.zarr"
        stores[key] = create_store(path, attrs={"benchmark": "frontier"}, splits=splits, codec=codec,
                                   shard_size=shard_size, vocab_size=V, hidden_size=d,
                                   head=head if codec.name == "factored" else None, overwrite=True)
    from tqdm.auto import tqdm

    total = sum(len(a) for a in splits.values()) * next(iter(splits.values())).shape[1]
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"teacher -> {len(stores)} stores", dynamic_ncols=True)
    for split, ids in splits.items():
        first = next(iter(stores.values()))
        for k in range(first.num_shards(split)):
            a, b = first.shard_range(split, k)
            parts: dict[str, list[dict]] = {key: [] for key in stores}
            for _, h, logits in teacher_pass(teacher, ids[a:b], batch, device):
                for key, store in stores.items():
                    x = h if store.codec.input_kind == "hidden" else logits
                    parts[key].append({n: t.cpu() for n, t in store.codec.encode(x).items()})
                bar.update(h.shape[0] * h.shape[1])
                del h, logits
            for key, store in stores.items():
                write_shard(store, split, k, {n: torch.cat([p[n] for p in parts[key]]) for n in parts[key][0]})
    bar.close()
    return {key: open_store(s.location) for key, s in stores.items()}


@torch.no_grad()
def score(model, ids_NL: np.ndarray, h_NLD: torch.Tensor, head: Head, device, batch: int = 4) -> dict:
    """Validation perplexity, mean KL(teacher || student) at T=1 and top-1 agreement over next-token targets,
    against the fp32 teacher (its final hidden states through its head), on `device`."""
    model.eval()
    ce = kl = agree = 0.0
    n = 0
    for s in range(0, len(ids_NL), batch):
        ids = torch.as_tensor(ids_NL[s:s + batch], dtype=torch.long, device=device)
        z = model(input_ids=ids).logits.float()[:, :-1].flatten(0, 1)
        y = ids[:, 1:].flatten()
        t_logp = head.logits(h_NLD[s:s + batch, :-1].to(device).flatten(0, 1)).log_softmax(-1)
        s_logp = z.log_softmax(-1)
        ce -= float(s_logp.gather(1, y[:, None]).sum())
        kl += float((t_logp.exp() * (t_logp - s_logp)).sum())
        agree += float((s_logp.argmax(-1) == t_logp.argmax(-1)).sum())
        n += len(y)
    return {"perplexity": math.exp(ce / n), "kl_to_teacher": kl / n, "top1_agreement": agree / n, "targets": n}


@torch.no_grad()
def target_tv(store, h_NLD: torch.Tensor, head: Head, T: float, device, batch: int = 4) -> float:
    """Mean over validation positions of 1/2 sum |p_T - r_T|: the fp32 teacher at T against what the store
    reconstructs at T (a sparse store's decode: the sampled draws' empirical distribution, or the top k with
    the tail spread evenly; a refusing store's value is still shown)."""
    total, n = 0.0, 0
    N, L = h_NLD.shape[:2]
    for s in range(0, N, batch):
        idx = list(range(s, min(s + batch, N)))
        tb = store.teacher_batch("validation", idx).to(device)
        p = (head.logits(h_NLD[idx].to(device).flatten(0, 1)) / T).softmax(-1)
        r = (tb.logits() / T).softmax(-1)
        total += float(0.5 * (p - r).abs().sum())
        n += len(idx) * L
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None,
                    help="teacher spec (default: params.yaml's, builtin:smollm2-135m); a .gguf file path works")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--student", default="kd20", help="the params.yaml student whose init and train keys are used")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="frontier_out", help="folder for frontier.md/.json/.png (and scratch stores)")
    ap.add_argument("--max-steps", type=int, default=None, help="override the student's steps (default: its epochs)")
    ap.add_argument("--tokens", choices=("demo", "small"), default="demo",
                    help="demo: params.yaml's data; small: seq_len 64, 1,024 train / 256 validation tokens (a smoke test)")
    ap.add_argument("--settings", default=None, help="comma-separated subset of: " + ", ".join(s[0] for s in SETTINGS))
    ap.add_argument("--keep-stores", action="store_true", help="keep the scratch stores in OUT/work")
    ap.add_argument("--stores-only", action="store_true",
                    help="measure bytes/token and target TV of every setting's store, train no student")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()
    device = torch.device(args.device)
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    overrides = [f"paths.tokens={work / 'tokens.zarr'}"]
    if args.teacher:
        overrides.append(f"teacher.model={args.teacher}")
    if args.tokens == "small":
        overrides += ["data.seq_len=64", "data.max_train_tokens=1024", "data.max_validation_tokens=256",
                      "train.calibration_tokens=64"]
    cfg = load_config(args.params, overrides)
    scfg = cfg.student(args.student)
    tc = scfg.train
    if args.max_steps:
        tc.max_steps = args.max_steps
    T = tc.temperature
    wanted = None if args.settings is None else [s.strip() for s in args.settings.split(",")]
    unknown = set(wanted or ()) - {s[0] for s in SETTINGS}
    if unknown:
        sys.exit(f"error: unknown --settings {sorted(unknown)}; choose from {', '.join(s[0] for s in SETTINGS)}")
    settings = [(n, c, {k: (T if v == "T" else v) for k, v in p.items()}, seed) for n, c, p, seed in SETTINGS
                if wanted is None or n in wanted]
    if REFERENCE not in [s[0] for s in settings]:
        settings.insert(0, SETTINGS[0])

    # tokens: the real prepare stage
    from distill_pipe.data import open_tokens, run_prepare

    run_prepare(cfg)
    tokens = open_tokens(cfg.paths.tokens)
    splits = {s: np.asarray(tokens[s]["input_ids"][...]) for s in ("train", "validation")}
    L = splits["train"].shape[1]
    log.info("data: %d train / %d validation sequences of %d tokens", len(splits["train"]), len(splits["validation"]), L)

    # the initial student: kd20's init, layer selection on the train stage's calibration tokens (shared cache)
    from distill_pipe.students import cached_select_layers, keep_layers
    from distill_pipe.train import calibration_ids

    teacher = models.load_causal_lm(cfg.teacher.model, dtype=torch.float32).eval()
    spec = scfg.init.get("from_teacher", {})
    if args.stores_only:
        layers = list(range(teacher.config.num_hidden_layers))  # no student is trained
    elif "num_layers" in spec:
        calib = calibration_ids(splits["train"], tc.calibration_tokens)
        t0 = time.perf_counter()
        selection, hit = cached_select_layers(teacher.to(device), calib, spec["num_layers"],
                                              models.model_fingerprint(cfg.teacher.model))
        layers = selection["kept"]
        log.info("layer selection (%s): keep %s in %.0f s", "cache hit" if hit else "computed", layers,
                 time.perf_counter() - t0)
    elif "layers" in spec:
        layers = spec["layers"]
    else:
        sys.exit(f"error: frontier needs a from_teacher student; {args.student}'s init is {scfg.init}")
    teacher = teacher.to(device)
    head_dict = head_from_model(teacher)
    head = Head(head_dict["weight"], head_dict["bias"], head_dict["final_logit_softcapping"],
                head_dict["logit_scale"]).to(device)
    init_student = keep_layers(copy.deepcopy(teacher).cpu(), layers)
    V, d = teacher.config.vocab_size, teacher.config.hidden_size

    t0 = time.perf_counter()
    stores = build_stores(teacher, head_dict, splits, settings, work, cfg.teacher_logits.shard_size,
                          cfg.teacher_logits.batch_size, device)
    log.info("stores written in %.0f s", time.perf_counter() - t0)
    with torch.no_grad():  # the teacher's validation hidden states, for scoring every student against fp32
        h_val = torch.cat([h.cpu() for _, h, _ in teacher_pass(teacher, splits["validation"], 4, device)])
    teacher_score = score(teacher, splits["validation"], h_val, head, device)
    del teacher

    results = []
    for name, codec_name, params, seed in settings:
        store = stores[json.dumps([codec_name, params], sort_keys=True)]
        n_tok = sum(store.num_sequences(s) for s in store.splits) * L
        payload = sum(bytes_under(store, f"{s}/{p}") for s in store.splits for p in store.payload_names)
        row = {"setting": name, "codec": str(store.codec), "seed": seed, "bytes_per_token": payload / n_tok,
               "format_bytes": {f"d={dd},V={vv}": format_bytes(store.codec, dd, vv) for dd, vv in SHAPES},
               "target_tv": target_tv(store, h_val, head, T, device)}
        if args.stores_only:
            results.append({**row, "refused": "not trained (--stores-only)"})
            continue
        run_cfg = copy.deepcopy(tc)
        run_cfg.seed, run_cfg.eval_steps, run_cfg.save_steps = seed, 10**9, 10**9
        model = copy.deepcopy(init_student).to(device)
        t0 = time.perf_counter()
        try:
            trainer = NoCheckpoints(model, run_cfg, {s: store.input_ids(s) for s in store.splits}, store=store,
                                    out_dir=work / "runs" / name.replace(" ", "_"),
                                    info=DistInfo(0, 1, 0, device))
        except (ConfigError, ValueError) as e:
            log.info("%s: refused: %s", name, e)
            results.append({**row, "refused": str(e)})
            continue
        trainer.train()
        row.update(score(model, splits["validation"], h_val, head, device), train_seconds=time.perf_counter() - t0,
                   steps=trainer.step)
        log.info("%s: %.1f B/token, ppl %.3f, KL %.4f, top-1 %.4f (%.0f s)", name, row["bytes_per_token"],
                 row["perplexity"], row["kl_to_teacher"], row["top1_agreement"], row["train_seconds"])
        results.append(row)
        del model, trainer

    report = write_outputs(out, results, teacher_score, cfg, tc, args, device, V, d, time.perf_counter() - t_start)
    if not args.keep_stores:
        shutil.rmtree(work, ignore_errors=True)
    print(report)


def write_outputs(out: Path, results, teacher_score, cfg, tc, args, device, V, d, seconds) -> str:
    ref = next(r for r in results if r["setting"] == REFERENCE)
    ref = ref if "perplexity" in ref else {"perplexity": math.nan, "kl_to_teacher": math.nan, "top1_agreement": math.nan}
    noise = next((r for r in results if r["setting"] == f"{REFERENCE} seed 1" and "perplexity" in r), None)
    shapes = [f"d={dd},V={vv}" for dd, vv in SHAPES]
    lines = [f"Frontier: {args.student} init, {f'{tc.max_steps} steps' if tc.max_steps else f'{tc.num_epochs:g} epochs'}, "
             f"alpha {tc.alpha}, "
             f"T {tc.temperature}, lr {tc.learning_rate}, batch {tc.batch_size} x {cfg.data.seq_len}, "
             f"tokens {args.tokens}; teacher {cfg.teacher.model} (d={d}, V={V}); device {device}; "
             f"{seconds / 60:.1f} min in all",
             f"teacher: validation perplexity {teacher_score['perplexity']:.3f} over {teacher_score['targets']:,} targets",
             "",
             "| setting | B/token measured | B/token format " + " | ".join(shapes) + f" | target TV@{tc.temperature:g} | val ppl | ppl vs ref | "
             "KL to teacher | KL vs ref | top-1 agree | top-1 vs ref |",
             "|---|---|" + "---|" * len(shapes) + "---|---|---|---|---|---|---|"]
    for r in results:
        fmt = " | ".join(f"{r['format_bytes'][s]:,}" for s in shapes)
        if "refused" in r:
            lines.append(f"| {r['setting']} | {r['bytes_per_token']:,.0f} | {fmt} | {r['target_tv']:.3g} | "
                         f"refused: {r['refused']} ||||||")
            continue
        lines.append(
            f"| {r['setting']} | {r['bytes_per_token']:,.0f} | {fmt} | {r['target_tv']:.3g} | {r['perplexity']:.3f} | "
            f"{r['perplexity'] / ref['perplexity'] - 1:+.2%} | {r['kl_to_teacher']:.4f} | "
            f"{r['kl_to_teacher'] / ref['kl_to_teacher']:.3f}x | {r['top1_agreement']:.4f} | "
            f"{r['top1_agreement'] - ref['top1_agreement']:+.4f} |")
    if noise:
        lines += ["", f"Run-to-run noise of the reference (seed 1 vs seed 0, data order): perplexity "
                      f"{noise['perplexity'] / ref['perplexity'] - 1:+.2%}, KL "
                      f"{noise['kl_to_teacher'] / ref['kl_to_teacher'] - 1:+.2%}, top-1 "
                      f"{noise['top1_agreement'] - ref['top1_agreement']:+.4f}."]
    report = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(report)
    (out / "frontier.json").write_text(json.dumps({"teacher": teacher_score, "results": results}, indent=2) + "\n")
    try:
        write_png(out / "frontier.png", results, ref, noise)
    except ImportError as e:  # matplotlib missing: the table still counts
        report += f"\n(no PNG: {e})\n"
    log.info("wrote %s, %s, %s", out / "frontier.md", out / "frontier.json", out / "frontier.png")
    return report


def write_png(path: Path, results, ref, noise) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if "perplexity" not in r:
            continue
        ax.scatter(r["bytes_per_token"], r["perplexity"], s=30)
        ax.annotate(r["setting"], (r["bytes_per_token"], r["perplexity"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    if math.isfinite(ref["perplexity"]):
        ax.axhline(ref["perplexity"], color="grey", lw=0.8, ls="--", label="dense-bf16 student")
        ax.axhspan(ref["perplexity"] * 0.99, ref["perplexity"] * 1.01, color="grey", alpha=0.12, label="within 1%")
    if noise:
        ax.axhline(noise["perplexity"], color="grey", lw=0.8, ls=":", label="dense-bf16, seed 1")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes/token (measured, log scale)")
    ax.set_ylabel("student validation perplexity")
    ax.set_title("Student quality against store size, one student per codec setting")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
