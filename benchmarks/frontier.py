"""The student-quality frontier of the store codecs, paired over seeds: every codec setting trains one KD student
per seed (same init, data and steps; the seed sets the data order), and each is compared with the dense-bf16
student of the same seed: validation perplexity, KL to the teacher and top-1 agreement against the bytes/token
its store costs.

    python benchmarks/frontier.py --device cuda --seeds 0,1,2 --out frontier_out     # the demo's setting, GPU
    python benchmarks/frontier.py --device cuda --preset large --seeds 0,1,2 --out frontier_large   # GPU only
    python benchmarks/frontier.py --device cpu --preset cpu --seeds 0,1,2 --max-steps 4 \
        --settings "factored fp16,topk k=128,sampled n=16,headtail" --out /tmp/frontier   # ~35 min, 2-core CPU
    python benchmarks/frontier.py --max-steps 2 --tokens small --out /tmp/frontier   # a smoke test on CPU

The setting is the demo's (params.yaml): data (builtin pydoc corpus, 16,384 train / 4,096 validation tokens of
seq_len 256), student kd20 (the builtin teacher's 30 layers greedily dropped to 20, on the same calibration
tokens as the train stage), its alpha, T, learning rate, batch, epochs/steps. --preset cpu cuts the data to
2,048 / 512 tokens and the batch to 1 x 256; --preset large (for a GPU: 32 x 256 = 8,192 tokens a step,
~262k training tokens of every pydoc topic plus CPython's own stdlib .py sources, ~17 GB of dense-bf16 store)
trains on far more. --set KEY=VALUE overrides any params key after the preset. Seeds: --seeds, else the
config's train.seed alone. Per codec setting:
  1. the fp32 teacher's outputs over both splits are encoded into a store of that codec (the real
     create_store / write_shard / open_store path), on --device;
  2. per seed, a copy of the same initial student trains with the real DistillTrainer from that store
     (no checkpoints);
  3. the final student is scored on the validation split against the fp32 teacher itself (not the store):
     perplexity, KL(teacher || student) at T=1, top-1 agreement.
The reference is dense-bf16 (always trained). Each setting's difference to it is paired by seed: per seed, and
as mean +- SE over seeds (SE = sample sd / sqrt(seeds)): perplexity as 100 (ppl / ppl_ref - 1) %, KL absolute
and relative, top-1 absolute. A setting the trainer refuses (e.g. a store that cannot represent T) is reported
as refused, with the reason.

target TV@T: mean total variation between the fp32 teacher at the training T and the store's reconstruction at
T on the validation split (sampled: the draws' empirical distribution, which is unbiased, not close).
bytes/token measured: the store's payload bytes on disk (compressed; the factored head, stored once, excluded)
over its tokens. bytes/token at (d, V): the format's uncompressed payload size for a teacher with hidden size d
and vocabulary V (ids are uint16 up to V = 65,536, int32 beyond): what the format guarantees before zstd.
Writes frontier.md (the table), frontier.json and frontier.png (the paired perplexity difference, mean +- SE,
against bytes/token, log x) to --out and prints the table at the end.
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

# (setting name, codec, codec params). Sparse codecs are stored at the training temperature, filled in from the
# config ("T"). Every setting trains once per seed (--seeds) from the same initial student.
SETTINGS = [
    ("dense-bf16", "dense-bf16", {}),
    ("factored fp16", "factored", {}),
    ("factored klt-int8", "factored", {"hidden_dtype": "klt-int8", "step": 0.2}),
    ("dense-u8", "dense-u8", {}),
    ("topk k=32", "topk", {"k": 32, "temperature": "T"}),
    ("topk k=128", "topk", {"k": 128, "temperature": "T"}),
    ("sampled n=8", "sampled", {"draws": 8, "temperature": "T"}),
    ("sampled n=16", "sampled", {"draws": 16, "temperature": "T"}),
    ("sampled n=32", "sampled", {"draws": 32, "temperature": "T"}),
    ("sampled n=64", "sampled", {"draws": 64, "temperature": "T"}),
    ("headtail", "headtail", {"head": 4, "draws": 8, "temperature": "T"}),
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
    for name, codec_name, params in settings:
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


def paired_stats(diffs) -> dict:
    """Mean and standard error (sample sd / sqrt(n)) of per-seed paired differences; SE is NaN for one seed."""
    x = np.asarray(diffs, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "se": se, "n": n}


def paired_summary(results: list[dict], reference: str = REFERENCE) -> dict:
    """Per setting: its trained seeds' paired differences to the reference trained at the same seed, per seed and
    as mean +- SE: perplexity (relative %, 100 (ppl / ppl_ref - 1)), KL to the teacher (absolute and relative %),
    top-1 agreement (absolute). Seeds where either run is missing (refused, not trained) are left out."""
    ref = {r["seed"]: r for r in results if r["setting"] == reference and "perplexity" in r}
    diffs: dict[str, dict] = {}
    for r in results:
        if "perplexity" not in r or r["seed"] not in ref:
            continue
        b = ref[r["seed"]]
        d = diffs.setdefault(r["setting"], {"seeds": [], "ppl_pct": [], "kl_abs": [], "kl_pct": [], "top1_abs": []})
        d["seeds"].append(r["seed"])
        d["ppl_pct"].append(100 * (r["perplexity"] / b["perplexity"] - 1))
        d["kl_abs"].append(r["kl_to_teacher"] - b["kl_to_teacher"])
        d["kl_pct"].append(100 * (r["kl_to_teacher"] / b["kl_to_teacher"] - 1))
        d["top1_abs"].append(r["top1_agreement"] - b["top1_agreement"])
    return {name: {**d, **{f"{k}_stats": paired_stats(d[k]) for k in ("ppl_pct", "kl_abs", "kl_pct", "top1_abs")}}
            for name, d in diffs.items()}


def large_corpus(path: Path) -> Path:
    """The --preset large corpus as JSONL: every builtin pydoc topic, then every CPython .py source under the
    running interpreter's stdlib, installed packages left out (sorted by path; files that are not UTF-8 are skipped)."""
    import sysconfig

    from pydoc_data.topics import topics

    with path.open("w") as f:
        for k, v in sorted(topics.items()):
            f.write(json.dumps({"text": v}) + "\n")
        for py in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if {"site-packages", "dist-packages"} & set(py.parts):  # installed packages are not CPython's
                continue
            try:
                f.write(json.dumps({"text": py.read_text(encoding="utf-8")}) + "\n")
            except (UnicodeDecodeError, OSError):
                continue
    return path


# --preset: config overrides applied before --set. demo: params.yaml as it is. cpu: the demo's data cut to what a
# loaded 2-core CPU trains 15 students on in ~35 min with --max-steps 4 (the first training row is the demo's, so
# kd20's cached layer selection still applies). large: 32 x 256 = 8,192 tokens per optimizer step over ~262k
# training tokens of pydoc + CPython sources, for a GPU (the dense-bf16 store alone is ~60 KB/token: ~17 GB).
PRESETS = {
    "demo": [],
    "cpu": ["data.max_train_tokens=2048", "data.max_validation_tokens=512", "train.batch_size=1",
            "train.warmup_steps=1"],
    "large": ["data.max_train_tokens=262144", "data.max_validation_tokens=16384", "train.batch_size=32",
              "train.warmup_steps=10", "teacher_logits.shard_size=64", "teacher_logits.batch_size=32"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None,
                    help="teacher spec (default: params.yaml's, builtin:smollm2-135m); a .gguf file path works")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override, as the CLI's --set (repeatable), applied after --preset")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                    help="demo: params.yaml's data and batch; cpu: 2,048 train / 512 validation tokens, batch 1; "
                         "large: 32 x 256 per step over pydoc + CPython's stdlib sources (needs a GPU)")
    ap.add_argument("--seeds", default=None,
                    help="comma-separated training seeds (data order), e.g. 0,1,2; default: the config's train.seed")
    ap.add_argument("--student", default="kd20", help="the params.yaml student whose init and train keys are used")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="frontier_out", help="folder for frontier.md/.json/.png (and scratch stores)")
    ap.add_argument("--max-steps", type=int, default=None, help="override the student's steps (default: its epochs)")
    ap.add_argument("--tokens", choices=("demo", "small"), default="demo",
                    help="demo: the preset's data; small: seq_len 64, 1,024 train / 256 validation tokens (a smoke test)")
    ap.add_argument("--settings", default=None, help="comma-separated subset of: " + ", ".join(s[0] for s in SETTINGS)
                    + f" ({REFERENCE}, the reference, is always included)")
    ap.add_argument("--keep-stores", action="store_true", help="keep the scratch stores in OUT/work")
    ap.add_argument("--stores-only", action="store_true",
                    help="measure bytes/token and target TV of every setting's store, train no student")
    ap.add_argument("--dry-run", action="store_true", help="build and print the config and the runs, then stop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    t_start = time.perf_counter()
    device = torch.device(args.device)
    out = Path(args.out)
    work = out / "work"

    wanted = None if args.settings is None else [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(wanted or ()) - {s[0] for s in SETTINGS}
    if unknown:
        sys.exit(f"error: unknown --settings {sorted(unknown)}; choose from {', '.join(s[0] for s in SETTINGS)}")
    try:
        seeds = None if args.seeds is None else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"error: --seeds {args.seeds!r} is not a comma-separated list of integers; e.g. --seeds 0,1,2")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        sys.exit(f"error: --seeds {args.seeds!r} needs distinct integers; e.g. --seeds 0,1,2")

    overrides = [f"paths.tokens={work / 'tokens.zarr'}"] + PRESETS[args.preset]
    if args.preset == "large":
        overrides.append(f"data.source={work / 'corpus.jsonl'}")
    if args.teacher:
        overrides.append(f"teacher.model={args.teacher}")
    if args.tokens == "small":
        overrides += ["data.seq_len=64", "data.max_train_tokens=1024", "data.max_validation_tokens=256",
                      "train.calibration_tokens=64"]
    try:
        cfg = load_config(args.params, overrides + args.overrides)
        scfg = cfg.student(args.student)
    except (ConfigError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    tc = scfg.train
    if args.max_steps:
        tc.max_steps = args.max_steps
    seeds = seeds if seeds is not None else [tc.seed]
    T = tc.temperature
    settings = [(n, c, {k: (T if v == "T" else v) for k, v in p.items()}) for n, c, p in SETTINGS
                if wanted is None or n in wanted or n == REFERENCE]
    log.info("preset %s: %d train / %d validation tokens of seq_len %d, batch %d x %d, %s; seeds %s; settings: %s",
             args.preset, cfg.data.max_train_tokens, cfg.data.max_validation_tokens, cfg.data.seq_len,
             tc.batch_size * tc.gradient_accumulation_steps, cfg.data.seq_len,
             f"{tc.max_steps} steps" if tc.max_steps else f"{tc.num_epochs:g} epochs", seeds,
             ", ".join(s[0] for s in settings))
    if args.dry_run:
        for name, codec_name, params in settings:
            make_codec(codec_name, **params)  # a setting's codec params are checked here, not after an hour
        return

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.preset == "large":
        large_corpus(work / "corpus.jsonl")

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
    log.info("teacher: validation perplexity %.3f over %d targets", teacher_score["perplexity"],
             teacher_score["targets"])
    del teacher

    results = []
    for name, codec_name, params in settings:
        store = stores[json.dumps([codec_name, params], sort_keys=True)]
        n_tok = sum(store.num_sequences(s) for s in store.splits) * L
        payload = sum(bytes_under(store, f"{s}/{p}") for s in store.splits for p in store.payload_names)
        base = {"setting": name, "codec": str(store.codec), "bytes_per_token": payload / n_tok,
                "format_bytes": {f"d={dd},V={vv}": format_bytes(store.codec, dd, vv) for dd, vv in SHAPES},
                "target_tv": target_tv(store, h_val, head, T, device)}
        log.info("%s: %.1f B/token, target TV@%g %.4g", name, base["bytes_per_token"], T, base["target_tv"])
        for seed in seeds:
            row = {**base, "seed": seed}
            if args.stores_only:
                results.append({**row, "refused": "not trained (--stores-only)"})
                continue
            run_cfg = copy.deepcopy(tc)
            run_cfg.seed, run_cfg.eval_steps, run_cfg.save_steps = seed, 10**9, 10**9
            run_cfg.max_eval_sequences = 1  # the trainer's own final eval is unused: score() below counts
            model = copy.deepcopy(init_student).to(device)
            t0 = time.perf_counter()
            try:
                trainer = NoCheckpoints(model, run_cfg, {s: store.input_ids(s) for s in store.splits}, store=store,
                                        out_dir=work / "runs" / f"{name.replace(' ', '_')}-seed{seed}",
                                        info=DistInfo(0, 1, 0, device))
            except (ConfigError, ValueError) as e:
                log.info("%s: refused: %s", name, e)
                results.append({**row, "refused": str(e)})
                continue
            trainer.train()
            row.update(score(model, splits["validation"], h_val, head, device),
                       train_seconds=time.perf_counter() - t0, steps=trainer.step)
            log.info("%s seed %d: %.1f B/token, ppl %.3f, KL %.4f, top-1 %.4f (%.0f s)", name, seed,
                     row["bytes_per_token"], row["perplexity"], row["kl_to_teacher"], row["top1_agreement"],
                     row["train_seconds"])
            results.append(row)
            del model, trainer

    report = write_outputs(out, results, teacher_score, cfg, tc, args, seeds, device, V, d,
                           time.perf_counter() - t_start)
    if not args.keep_stores:
        shutil.rmtree(work, ignore_errors=True)
    print(report)


def _pm(st: dict, fmt: str) -> str:
    """mean +- SE, or the mean alone for one seed."""
    if not math.isfinite(st["se"]):
        return format(st["mean"], fmt)
    return f"{format(st['mean'], fmt)} ± {format(st['se'], fmt.lstrip('+'))}"


def write_outputs(out: Path, results, teacher_score, cfg, tc, args, seeds, device, V, d, seconds) -> str:
    summary = paired_summary(results)
    shapes = [f"d={dd},V={vv}" for dd, vv in SHAPES]
    by_setting: dict[str, list[dict]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    lines = [f"Frontier: {args.student} init, {f'{tc.max_steps} steps' if tc.max_steps else f'{tc.num_epochs:g} epochs'}, "
             f"alpha {tc.alpha}, T {tc.temperature}, lr {tc.learning_rate}, "
             f"batch {tc.batch_size * tc.gradient_accumulation_steps} x {cfg.data.seq_len}, preset {args.preset}, "
             f"tokens {args.tokens}; seeds {', '.join(map(str, seeds))}; teacher {cfg.teacher.model} (d={d}, V={V}); "
             f"device {device}; {seconds / 60:.1f} min in all",
             f"teacher: validation perplexity {teacher_score['perplexity']:.3f} over {teacher_score['targets']:,} targets",
             f"Differences are paired: each setting minus {REFERENCE} trained at the same seed; mean ± SE over seeds "
             "(SE = sd / sqrt(seeds)).",
             "",
             "| setting | B/token measured | B/token format " + " | ".join(shapes) + f" | target TV@{tc.temperature:g} | "
             "val ppl (mean) | ppl diff % | ppl diff % per seed | KL to teacher (mean) | KL diff | KL diff % | "
             "top-1 diff |",
             "|---|---|" + "---|" * len(shapes) + "---|" * 8]
    for name, rows in by_setting.items():
        r0 = rows[0]
        fmt = " | ".join(f"{r0['format_bytes'][s]:,}" for s in shapes)
        lead = f"| {name} | {r0['bytes_per_token']:,.0f} | {fmt} | {r0['target_tv']:.3g} | "
        trained = [r for r in rows if "perplexity" in r]
        if not trained:
            lines.append(lead + f"refused: {r0['refused']} |" + " |" * 6)
            continue
        ppl = float(np.mean([r["perplexity"] for r in trained]))
        kl = float(np.mean([r["kl_to_teacher"] for r in trained]))
        s = summary.get(name)
        if s is None or name == REFERENCE:
            diff = "— | — | " if name == REFERENCE else "no reference | | "
            lines.append(lead + f"{ppl:.3f} | {diff}{kl:.4f} | — | — | — |")
            continue
        per_seed = ", ".join(f"{v:+.2f}" for v in s["ppl_pct"])
        lines.append(lead + f"{ppl:.3f} | {_pm(s['ppl_pct_stats'], '+.2f')} | {per_seed} | {kl:.4f} | "
                     f"{_pm(s['kl_abs_stats'], '+.4f')} | {_pm(s['kl_pct_stats'], '+.2f')} | "
                     f"{_pm(s['top1_abs_stats'], '+.4f')} |")
        missing = [r for r in rows if "refused" in r]
        if missing:
            lines.append(f"| {name}: seeds {', '.join(str(r['seed']) for r in missing)} refused: "
                         f"{missing[0]['refused']} |" + " |" * (len(shapes) + 9))
    ses = [v["ppl_pct_stats"]["se"] for k, v in summary.items() if k != REFERENCE]
    ses = [x for x in ses if math.isfinite(x)]
    if ses:
        lines += ["", f"Largest SE of a paired perplexity difference: {max(ses):.2f}%; a difference beyond 2 x that "
                      f"({2 * max(ses):.2f}%) is resolved by these {len(seeds)} seeds."]
    report = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(report)
    (out / "frontier.json").write_text(json.dumps({"teacher": teacher_score, "seeds": seeds, "results": results,
                                                   "paired": summary}, indent=2) + "\n")
    try:
        write_png(out / "frontier.png", results, summary)
    except ImportError as e:  # matplotlib missing: the table still counts
        report += f"\n(no PNG: {e})\n"
    log.info("wrote %s, %s, %s", out / "frontier.md", out / "frontier.json", out / "frontier.png")
    return report


def write_png(path: Path, results, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bpt = {r["setting"]: r["bytes_per_token"] for r in results}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, s in summary.items():
        st = s["ppl_pct_stats"]
        ax.errorbar(bpt[name], st["mean"], yerr=st["se"] if math.isfinite(st["se"]) else None, fmt="o", ms=5,
                    capsize=3)
        ax.annotate(name, (bpt[name], st["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8, ls="--", label=f"{REFERENCE} student")
    ax.axhspan(-1, 1, color="grey", alpha=0.12, label="within 1%")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes/token (measured, log scale)")
    ax.set_ylabel(f"validation perplexity vs {REFERENCE}, same seed (%)")
    n = max((s["ppl_pct_stats"]["n"] for s in summary.values()), default=0)
    ax.set_title(f"Student quality against store size: paired difference, mean ± SE over {n} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
