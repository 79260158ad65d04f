"""Train-step time of KD from each store codec against CE-only and online KD; peak RSS against store size.

    python benchmarks/train_step.py                       # builtin teacher, 20-layer student, batch 2 x 256
    python benchmarks/train_step.py --batch-size 1 --seq-len 128 --steps 2    # quicker
    python benchmarks/train_step.py --batch-size 4 --seq-len 256 --skip-rss --unfused  # the demo's step, old vs new
    python benchmarks/train_step.py --synthetic 128256,512,4 --keep-layers 2 --batch-size 2 --seq-len 512 --skip-rss
                                    # a large vocabulary: a random Llama teacher (V, d, layers) built on the spot

Every variant runs the real `DistillTrainer.train_step` (store read, decode, chunked fp32 loss, backward,
AdamW) on the same student weights and the same batch, in one process:
  - CE-only: alpha = 1, no teacher at all: the floor;
  - KD from a store: alpha = 0.5, T = 2, teacher logits from a store of each codec (sampled: 32 draws at T = 2,
    topk: k = 32 at T = 2, both read as sparse targets: no (N, V) teacher tensor);
  - online KD: the same loss with the teacher's forward inside the step.
The ideal speedup of store KD over online KD is (teacher forward + student step) / student step.
--unfused also times each variant with the loss over the student's whole (N, V) logits (tests/unfused.py, the
path before the loss was fused with the head), in the same rounds.
Peak RSS: a fresh process runs KD steps over random batches of a store, then of a 10x larger one.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_pipe import models  # noqa: E402
from distill_pipe.config import TrainConfig  # noqa: E402
from distill_pipe.store import create_store, head_from_model, make_codec, open_store  # noqa: E402
from distill_pipe.store.writer import write_shard  # noqa: E402
from distill_pipe.trainer import DistillTrainer, Trainer  # noqa: E402

CODECS = ("factored", "dense-bf16", "dense-u8", "sampled", "topk", "headtail")
# The sparse codecs hold the teacher at the benchmark's T = 2 (they refuse any other training temperature).
CODEC_PARAMS = {"sampled": {"draws": 32, "temperature": 2.0}, "topk": {"k": 32, "temperature": 2.0},
                "headtail": {"head": 4, "draws": 16, "temperature": 2.0}}


def corpus_ids(tok, n: int, seq_len: int) -> np.ndarray:
    """(n, seq_len) int32 from CPython's pydoc topics joined with EOS (the project's builtin corpus)."""
    from pydoc_data.topics import topics

    stream: list[int] = []
    for _, text in sorted(topics.items()):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n * seq_len:
            break
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def teacher_outputs(teacher, ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states (B, L, d), logits (B, L, V)) of the fp32 teacher."""
    with torch.inference_mode():
        h = teacher.get_decoder()(input_ids=ids_BL).last_hidden_state
        return h, teacher.get_output_embeddings()(h)


def build_store(path: Path, codec_name: str, ids: np.ndarray, x_BLX: torch.Tensor, head: dict | None,
                vocab: int, hidden: int, repeat: int = 1):
    """A store whose train split is `ids` repeated `repeat` times (shard = the batch), payload encoded once."""
    codec = make_codec(codec_name, **CODEC_PARAMS.get(codec_name, {}))
    B = ids.shape[0]
    store = create_store(str(path), attrs={"benchmark": True}, codec=codec, shard_size=B, vocab_size=vocab,
                         hidden_size=hidden, head=head, overwrite=True,
                         splits={"train": np.concatenate([ids] * repeat), "validation": ids[:1]})
    payload = {k: v.cpu() for k, v in codec.encode(x_BLX).items()}
    for k in range(repeat):
        write_shard(store, "train", k, payload)
    write_shard(store, "validation", 0, {k: v[:1] for k, v in payload.items()})
    return open_store(str(path))


class OnlineKD(DistillTrainer):
    """KD with the teacher's forward inside the step (what a store avoids)."""

    def __init__(self, model, cfg, data, *, teacher, out_dir):
        Trainer.__init__(self, model, cfg, data, out_dir=out_dir, show_progress=False)  # no store to check
        self.teacher, self.store, self.vocab_size = teacher, None, None

    def compute_loss(self, model, batch):
        from distill_pipe.losses import model_loss

        _, t_BLV = teacher_outputs(self.teacher, batch.input_ids_BL)
        t_NV = t_BLV.flatten(0, 1)
        return model_loss(model, batch.input_ids_BL, batch.targets_BL, lambda s, e: t_NV[s:e], vocab_size=None,
                          alpha=self.cfg.alpha, temperature=self.cfg.temperature, chunk_size=self.cfg.loss_chunk_size)


class Unfused:
    """Mixin: the trainer's loss through tests/unfused.py's model_loss (full (B, L, V) logits, then the loss)."""

    def compute_loss(self, model, batch):
        import distill_pipe.trainer as trainer_module
        from tests import unfused

        fused, trainer_module.model_loss = trainer_module.model_loss, unfused.model_loss
        try:
            return super().compute_loss(model, batch)
        finally:
            trainer_module.model_loss = fused


class UnfusedDistillTrainer(Unfused, DistillTrainer):
    pass


def make_trainer(student, ids: np.ndarray, out: Path, alpha: float, store=None, teacher=None,
                 chunk: int | None = None, unfused: bool = False) -> DistillTrainer:
    # dense-u8 dropped its tail: its store refuses T > 1, so it is timed at T = 1 (the same work per step)
    temperature = 1.0 if store is not None and store.codec.name == "dense-u8" else 2.0
    cfg = TrainConfig(batch_size=ids.shape[0], alpha=alpha, temperature=temperature, max_steps=1000, warmup_steps=0,
                      loss_chunk_size=chunk)
    data = {"train": store.input_ids("train") if store else ids, "validation": ids[:1]}
    if teacher is not None:
        return OnlineKD(student, cfg, data, teacher=teacher, out_dir=out)
    cls = UnfusedDistillTrainer if unfused else DistillTrainer
    return cls(student, cfg, data, store=store, out_dir=out, show_progress=False)


def time_step(trainer: DistillTrainer, indices: list[int]) -> float:
    """Seconds of one optimizer step on `indices`, reading the store included."""
    t0 = time.perf_counter()
    trainer.train_step(trainer.micro_batches("train", indices))
    return time.perf_counter() - t0


def rss_child(store_path: str, student_file: str, steps: int) -> None:
    """Run KD steps over random batches of the whole store; print peak RSS in MiB."""
    torch.set_num_threads(2)
    student = torch.load(student_file, weights_only=False)
    store = open_store(store_path)
    B = store.shard_size
    with tempfile.TemporaryDirectory() as tmp:
        tr = make_trainer(student, np.asarray(store.input_ids("validation")[:1]).repeat(B, 0), Path(tmp), 0.5,
                          store=store)
        for s in range(steps):
            tr.train_step(tr.micro_batches("train", tr.step_indices(s)))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so it would report the parent's peak.
    hwm_kib = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(f"RSS_MIB {hwm_kib / 1024:.0f}")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="builtin:smollm2-135m")
    ap.add_argument("--synthetic", metavar="V,D,LAYERS",
                    help="instead of --teacher: a randomly initialised Llama of this vocabulary, hidden size and "
                         "depth (random token ids; step time does not depend on what the weights have learnt)")
    ap.add_argument("--keep-layers", type=int, default=20, help="decoder layers the student keeps")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median and best reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--chunk-sizes", type=int, nargs="*", default=[],
                    help="also time KD from the factored store with these explicit train.loss_chunk_size values "
                         "(the other variants use the default, auto)")
    ap.add_argument("--rss-shards", type=int, default=32, help="shards (of batch-size sequences) in the small store")
    ap.add_argument("--rss-steps", type=int, default=3)
    ap.add_argument("--skip-rss", action="store_true", help="time the steps only")
    ap.add_argument("--codecs", nargs="*", default=list(CODECS), choices=CODECS, help="store codecs to time")
    ap.add_argument("--skip-online", action="store_true", help="do not time online KD")
    ap.add_argument("--unfused", action="store_true",
                    help="also time CE-only and each store codec with the unfused loss (tests/unfused.py)")
    ap.add_argument("--rss-child", nargs=3, metavar=("STORE", "STUDENT", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))

    from distill_pipe.students import keep_layers

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.synthetic:
        from transformers import LlamaConfig, LlamaForCausalLM

        sv, sd, sl = (int(x) for x in args.synthetic.split(","))
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=sv, hidden_size=sd, intermediate_size=4 * sd,
                                               num_hidden_layers=sl, num_attention_heads=max(1, sd // 64),
                                               num_key_value_heads=max(1, sd // 256), tie_word_embeddings=True))
        tok = None
    else:
        teacher = models.load_causal_lm(args.teacher, dtype=torch.float32)
        tok = models.load_tokenizer(args.teacher)
    n_layers = teacher.config.num_hidden_layers
    keep = min(args.keep_layers, n_layers)
    # Which layers does not change the step time; keep the ends (the first and last matter most) and
    # spread the rest.
    layers = sorted({0, n_layers - 1} | set(np.linspace(1, n_layers - 2, keep - 2).round().astype(int).tolist()))
    student = keep_layers(copy.deepcopy(teacher), layers)
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    B, L = args.batch_size, args.seq_len
    ids = corpus_ids(tok, B, L) if tok is not None else \
        np.random.default_rng(0).integers(0, V, (B, L)).astype(np.int32)
    ids_BL = torch.from_numpy(ids).long()
    print(f"teacher {'synthetic ' + args.synthetic if args.synthetic else args.teacher}: {n_layers} layers, d={d}, V={V}; student keeps {len(layers)} layers; "
          f"batch {B} x {L} = {B * L} tokens; best and median of {args.steps} steps after {args.warmup} warm-up; "
          f"torch threads {torch.get_num_threads()}; setup {time.perf_counter() - t0:.0f} s", flush=True)

    h_BLD, logits_BLV = teacher_outputs(teacher, ids_BL)

    work = Path(tempfile.mkdtemp(prefix="train_step_bench_"))
    head = head_from_model(teacher)
    stores = {}
    for name in args.codecs:
        x = h_BLD if make_codec(name).input_kind == "hidden" else logits_BLV
        stores[name] = build_store(work / f"{name}.zarr", name, ids, x, head if name == "factored" else None, V, d)

    # Variants take turns step by step (round robin), so a change in machine load hits them alike.
    indices = list(range(B))
    from distill_pipe.losses import default_chunk_size

    auto = default_chunk_size(V, "cpu")
    variants = [("CE only (alpha=1)", None, None, None), *[(f"KD, store {c}" + (" (T=1)" if c == "dense-u8" else ""), c, None, None) for c in args.codecs],
                *([] if args.skip_online else [("KD online (teacher fwd in step)", None, teacher, None)]),
                *[(f"KD, store factored, loss chunk {n}", "factored", None, n) for n in args.chunk_sizes]]
    print(f"loss chunk: auto = {auto} positions unless named", flush=True)
    if args.unfused:
        variants += [(f"{label} [unfused]", codec, None, chunk, True) for label, codec, online, chunk in variants
                     if online is None and chunk is None]
    trainers = {}
    for label, codec, online, chunk, *unfused in variants:
        alpha = 1.0 if codec is None and online is None else 0.5
        trainers[label] = make_trainer(copy.deepcopy(student), ids, work / "out", alpha, store=stores.get(codec),
                                       teacher=online, chunk=chunk, unfused=bool(unfused))
    times: dict[str, list[float]] = {label: [] for label in trainers}
    fwd = []  # the teacher forward alone (what online KD adds to each step), in the same rounds
    for i in range(args.warmup + args.steps):
        for label, tr in trainers.items():
            t = time_step(tr, indices)
            if i >= args.warmup:
                times[label].append(t)
        t = time.perf_counter()
        teacher_outputs(teacher, ids_BL)
        if i >= args.warmup:
            fwd.append(time.perf_counter() - t)
    teacher_fwd = min(fwd)
    for label, ts in times.items():
        print(f"  {label}: " + ", ".join(f"{t:.2f}" for t in ts) + " s", flush=True)
    del trainers
    # On a shared machine the best of N is the least disturbed measure; the median is printed beside it.
    results = {label: min(ts) for label, ts in times.items()}
    medians = {label: statistics.median(ts) for label, ts in times.items()}

    ce, online_t = results["CE only (alpha=1)"], results.get("KD online (teacher fwd in step)", math.nan)
    ce_unfused = results.get("CE only (alpha=1) [unfused]")
    ideal = (teacher_fwd + ce) / ce
    print()
    print(f"| variant | s/step best (median) | vs CE-only | speedup over online KD (ideal {ideal:.2f}x) "
          "| payload bytes/token |" + (" vs unfused |" if ce_unfused else ""))
    print("|---|---|---|---|---|" + ("---|" if ce_unfused else ""))
    for label, t in results.items():
        codec = label.split("store ")[-1].split(",")[0].split(" ")[0] if "store" in label else None
        # payload only: the factored head (V x d, stored once) would dominate a store this small
        size = f"{sum(du(work / f'{codec}.zarr' / s) for s in ('train', 'validation')) / ((B + 1) * L):,.0f}" \
            if codec else ""
        speedup = "" if math.isnan(online_t) else f"{online_t / t:.2f}x"
        # an unfused row is compared with the unfused CE-only; a fused row also with its unfused twin
        base = ce_unfused if label.endswith("[unfused]") else ce
        old = results.get(f"{label} [unfused]")
        row = f"| {label} | {t:.2f} ({medians[label]:.2f}) | {t / base:.2f}x | {speedup} | {size} |"
        if ce_unfused:
            row += f" {t / old:.2f}x |" if old else " |"
        print(row)
    print(f"| teacher forward alone | {teacher_fwd:.2f} ({statistics.median(fwd):.2f}) | | | |")

    if args.skip_rss:
        shutil.rmtree(work, ignore_errors=True)
        return
    # peak RSS: the same KD steps from a store and from a 10x larger one, each in a fresh process
    student_file = work / "student.pt"
    torch.save(student, student_file)  # the whole module: save_pretrained refuses models loaded from GGUF
    del teacher, student
    print()
    print(f"peak RSS of a fresh process running {args.rss_steps} KD steps over random batches of the store:")
    print("| store | sequences | on disk | peak RSS |")
    print("|---|---|---|---|")
    for name in ("factored", "dense-u8"):
        for factor in (1, 10):
            x = h_BLD if make_codec(name).input_kind == "hidden" else logits_BLV
            path = work / f"rss-{name}-{factor}.zarr"
            build_store(path, name, ids, x, head if name == "factored" else None, V, d,
                        repeat=args.rss_shards * factor)
            res = subprocess.run([sys.executable, __file__, "--rss-child", str(path), str(student_file),
                                  str(args.rss_steps)], capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS_MIB")]
            rss = line[0].split()[1] + " MiB" if line else f"failed: {res.stderr.strip().splitlines()[-1:]}"
            print(f"| {name} x{factor} | {args.rss_shards * factor * B} | {du(path) / 2**20:,.0f} MiB | {rss} |",
                  flush=True)
            shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
