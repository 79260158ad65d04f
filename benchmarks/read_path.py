"""Read + decompress tokens/s of the store's read path per codec, and how well reading ahead hides it.

    python benchmarks/read_path.py                          # every codec, builtin and Llama-3-8B shapes
    python benchmarks/read_path.py --shapes builtin --codecs factored dense-u8 --seconds 5
    python benchmarks/read_path.py --shapes --skip-overlap --store data/teacher_logits.zarr   # a real store

Part 1, read + decompress (`LogitStore.teacher_batch`: fetch, checksum, decompress into one CPU payload,
before any decode) in one process, on random batches of 4 whole sequences, for every codec registered in
store/codecs CODECS, at the builtin teacher's shapes (d=576, V=49,152) and at Llama-3-8B's (d=4096,
V=128,256), and dense-u8 as earlier stores laid it out (transposed vocab-major inside each chunk). Each
store is read two ways, batch by batch in turn: the fast path (store/shards.py) and zarr's own indexing
(`teacher_batch(fast=False)`, what every read went through before). "Before" for dense-u8 = the transposed
store through zarr's indexing; "now" = a new store through the fast path. Cores used = process CPU
time / wall time during the fast reads. The stores sit in the page cache (just written): this measures the
CPU cost of reading, not a disk.

The payload is synthetic with realistic statistics: teacher logits z = s * h @ W.T / sqrt(d) + log pi, h and
W standard normal (random hidden states through a random head), log pi a Zipf(1.1) unigram prior over a
random permutation of the vocabulary (real vocabularies are heavy-tailed), and s chosen (bisection) so that
the mean entropy is 2.5 nats, about the builtin teacher's on its pydoc corpus (2.67 nats measured over 2,048
positions). The factored codec stores those h with head weight s * W / sqrt(d) and bias log pi. One shard's
payload is encoded once and written to every shard (encoding dense codecs at V=128k is the slow part).

Part 2, overlap: the real training loop (`DistillTrainer.train_step` over the read-ahead stream, AdamW,
clipping, backward of a one-weight model) reading real payloads of one store, whose compute is a stand-in
of fixed duration C per micro-batch (a GPU computing while the CPU is free). R = the time one micro-batch's
payload takes to read (fetch, checksum, decompress: `teacher_batch`, median). The loop's own host work o
(the step with nothing read and nothing to sleep) is counted in C: the stand-in sleeps C - o. With
train.prefetch = 2 a step must cost max(C, R) within 5%, for C in {0.5R, R, 2R}; inline reads (prefetch 0)
cost C + R. The reads decode on the usable CPUs less one (`--overlap-read-threads`), leaving the loop a core,
as DISTILL_PIPE_READ_THREADS would on a host whose cores the training thread shares.

Part 3, contention: a thread that launches small torch ops back to back (what a training thread feeding a
GPU does) timed alone and while one other thread checksums the store's inner chunks back to back, with the
crc32c implementation the read path uses and with google-crc32c (zarr's, which holds the GIL). Only the
checksum is isolated: reads as a whole also take cores, which on a 2-core machine swamps the GIL's share.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np
import torch
from zarr.codecs import TransposeCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill_pipe.config import TrainConfig  # noqa: E402
from distill_pipe.losses import LossSums  # noqa: E402
from distill_pipe.store import create_store, make_codec, open_store, shards  # noqa: E402
from distill_pipe.store.codecs import CODECS, DenseU8Codec, PayloadSpec  # noqa: E402
from distill_pipe.store.codecs.base import zstd_crc  # noqa: E402
from distill_pipe.store.shards import decode_threads  # noqa: E402
from distill_pipe.store.writer import write_shard  # noqa: E402
from distill_pipe.trainer import DistillTrainer  # noqa: E402

SHAPES = {"builtin": (576, 49152), "llama3-8b": (4096, 128256)}
LEGACY = "dense-u8-transposed"  # the dense-u8 layout of earlier stores, as a baseline (still readable)
TARGET_ENTROPY = 2.5


def _google_crc(data: np.ndarray) -> bytes:
    """The checksum as the read path computed it before (google-crc32c holds the GIL)."""
    return np.uint32(google_crc32c.value(data)).tobytes()


def synthetic_teacher(d: int, V: int, seed: int = 0):
    """(W (V, d) scaled head weight, log prior (V,)) giving ~TARGET_ENTROPY nats on standard normal h."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g) / math.sqrt(d)
    prior = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))[torch.randperm(V, generator=g)]
    prior -= torch.logsumexp(prior, 0)
    h = torch.randn(256, d, generator=g)
    base = h @ W.T

    def entropy(s):
        logp = torch.log_softmax(s * base + prior, -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    lo, hi = 0.0, 64.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(mid) > TARGET_ENTROPY else (lo, mid)
    s = (lo + hi) / 2
    return W * s, prior, entropy(s)


class TransposedDenseU8(DenseU8Codec):
    """dense-u8 as stores were written before: logprobs_u8 transposed vocab-major inside each chunk."""

    def payload_specs(self, vocab_size, hidden_size):
        specs = super().payload_specs(vocab_size, hidden_size)
        specs["logprobs_u8"] = PayloadSpec((vocab_size,), np.dtype(np.uint8), (TransposeCodec(order=(0, 2, 1)),),
                                           zstd_crc(self.zstd_level))
        return specs


def build_store(path: Path, codec_name: str, d: int, V: int, W, prior, n_seq: int, seq_len: int, shard: int):
    codec = TransposedDenseU8() if codec_name == LEGACY else make_codec(codec_name)
    head = {"weight": W, "bias": prior} if codec.input_kind == "hidden" else None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (n_seq, seq_len)).astype(np.int32)
    store = create_store(str(path), attrs={"benchmark": "read_path"}, splits={"train": ids}, codec=codec,
                         shard_size=shard, vocab_size=V, hidden_size=d, head=head, overwrite=True)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(shard, seq_len, d, generator=g)
    with torch.inference_mode():
        x = h if codec.input_kind == "hidden" else torch.addmm(prior, h.reshape(-1, d), W.T).reshape(shard, seq_len, V)
        payload = {k: v.cpu() for k, v in store.codec.encode(x).items()}
    del x
    for k in range(store.num_shards("train")):
        write_shard(store, "train", k, payload)
    return open_store(str(path))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_reads(store, batches, seconds: float) -> dict:
    """Fast and zarr reads of the same random batches, in turn; tokens/s of each and the fast path's cores."""
    out = {"fast": [0.0, 0, 0.0], "zarr": [0.0, 0, 0.0]}  # wall, tokens, cpu
    L = store.seq_len
    store.teacher_batch("train", batches[0])  # the shard indexes, and warm caches
    store.teacher_batch("train", batches[0], fast=False)
    t_end = time.perf_counter() + seconds
    i = 0
    while i < 2 or (time.perf_counter() < t_end and i < len(batches)):
        for mode in ("fast", "zarr"):
            c0, t0 = cpu_seconds(), time.perf_counter()
            store.teacher_batch("train", batches[i % len(batches)], fast=mode == "fast")
            out[mode][0] += time.perf_counter() - t0
            out[mode][2] += cpu_seconds() - c0
            out[mode][1] += len(batches[i % len(batches)]) * L
        i += 1
    return {m: {"tok_s": tok / wall, "cores": cpu / wall} for m, (wall, tok, cpu) in out.items()}


class StandInTrainer(DistillTrainer):
    """The real train step and read-ahead; compute_loss takes the teacher payload, then sleeps."""

    sleep_s = 0.0
    read = True

    def compute_loss(self, model, batch):
        tb = batch.teacher
        if tb is None and self.read:  # prefetch 0: read inline, as the real trainer does
            tb = self.teacher_to_device(self.store.teacher_batch(batch.split, batch.indices))
        time.sleep(self.sleep_s)
        zero = torch.zeros(())
        return LossSums(loss=next(model.parameters()).sum() * 0, ce=zero, kl=zero, num_tokens=batch.num_tokens)


def step_seconds(store, prefetch: int, sleep_s: float, steps: int, out: Path, read: bool = True) -> float:
    """Median seconds per optimizer step after two warm-up steps (the first has nothing read ahead)."""
    model = torch.nn.Linear(1, 1)
    cfg = TrainConfig(batch_size=4, alpha=0.5, max_steps=steps + 2, prefetch=prefetch, eval_steps=10**6,
                      save_steps=10**6, warmup_steps=0)
    data = {"train": store.input_ids("train"), "validation": store.input_ids("train")[:1]}
    tr = StandInTrainer(model, cfg, data, store=store, out_dir=out, show_progress=False)
    tr.sleep_s, tr.read = sleep_s, read
    stream = tr.open_stream(("train", tr.step_indices(s), None) for s in range(steps + 2))
    times = []
    try:
        for s in range(steps + 2):
            t0 = time.perf_counter()
            batches = stream.next_step() if stream else tr.micro_batches("train", tr.step_indices(s))
            tr.train_step(batches)
            times.append(time.perf_counter() - t0)
    finally:
        if stream is not None:
            stream.close()
    return float(np.median(times[2:]))


def read_seconds(store, batches, n: int = 12) -> float:
    """Median seconds to read one micro-batch's teacher payload (fetch, checksum, decompress)."""
    store.teacher_batch("train", batches[0])
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        store.teacher_batch("train", batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def launch_loop_seconds(n: int = 4000) -> float:
    """A thread launching n tiny torch ops back to back (best of 3)."""
    best = math.inf
    for _ in range(3):
        x = torch.zeros(16)
        t0 = time.perf_counter()
        for _ in range(n):
            x = x + 1
        best = min(best, time.perf_counter() - t0)
    return best


def checksum_contention(chunk_bytes: int, crc) -> float:
    """The launch loop's time while another thread checksums chunk_bytes-sized chunks back to back, over its time
    alone (median of 3). One background thread on a machine with a free core: what remains is the GIL."""
    chunk = np.random.default_rng(0).integers(0, 256, chunk_bytes, dtype=np.uint8)
    ratios = []
    for _ in range(3):
        alone = launch_loop_seconds(500)
        stop = threading.Event()

        def checksums():
            while not stop.is_set():
                crc(chunk)

        th = threading.Thread(target=checksums, daemon=True)
        th.start()
        time.sleep(0.05)
        try:
            ratios.append(launch_loop_seconds(500) / alone)
        finally:
            stop.set()
            th.join()
    return float(np.median(ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--codecs", nargs="*", default=[*CODECS, LEGACY],
                    help=f"default: every registered codec and {LEGACY} (the dense-u8 layout of earlier stores)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--sequences", type=int, default=16, help="sequences per store (4 shards of 4)")
    ap.add_argument("--seconds", type=float, default=8.0, help="timed reads per codec and path (at least 2 batches)")
    ap.add_argument("--overlap-codec", default="factored")
    ap.add_argument("--overlap-shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--overlap-steps", type=int, default=24)
    ap.add_argument("--overlap-read-threads", type=int, default=0,
                    help="decode threads while the loop runs (default: the usable CPUs less one, for the loop)")
    ap.add_argument("--skip-overlap", action="store_true")
    ap.add_argument("--store", nargs="*", default=[],
                    help="also time these existing stores (paths or URLs; their train split), e.g. a real teacher's")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp folder, removed)")
    args = ap.parse_args()
    unknown = sorted(set(args.codecs) - set(CODECS) - {LEGACY})
    if unknown:
        sys.exit(f"error: unknown codec(s) {', '.join(unknown)}; registered: {', '.join(CODECS)}")

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="read_path_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    L, N, S = args.seq_len, args.sequences, 4
    rng = np.random.default_rng(0)
    batches = [rng.choice(N, 4, replace=False).tolist() for _ in range(64)]
    print(f"read path: {os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable, "
          f"{decode_threads()} decode threads; {N} sequences x {L} tokens per store, shards of {S}, random batches "
          f"of 4 sequences; page-cached stores; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    keep = {}
    try:
        for shape in args.shapes:
            d, V = SHAPES[shape]
            W, prior, ent = synthetic_teacher(d, V)
            print(f"\n{shape}: d={d}, V={V:,}; synthetic teacher mean entropy {ent:.2f} nats", flush=True)
            for name in args.codecs:
                t0 = time.perf_counter()
                path = work / f"{shape}-{name}.zarr"
                store = build_store(path, name, d, V, W, prior, N, L, S)
                size = du(path / "train") - du(path / "train" / "input_ids")
                r = time_reads(store, batches, args.seconds)
                row = (shape, name, size / (N * L), r["zarr"]["tok_s"], r["fast"]["tok_s"], r["fast"]["cores"])
                rows.append(row)
                print(f"  {name:10s} {row[2]:9,.0f} B/token  zarr {row[3]:9,.0f} tok/s  fast {row[4]:9,.0f} tok/s "
                      f"({row[4] / row[3]:.1f}x, {row[5]:.2f} cores busy)  [build {time.perf_counter() - t0:.0f} s]",
                      flush=True)
                if not args.skip_overlap and (name, shape) == (args.overlap_codec, args.overlap_shape):
                    keep["overlap"] = path
                else:
                    shutil.rmtree(path, ignore_errors=True)
            del W, prior

        for location in args.store:
            store = open_store(location)
            n = store.num_sequences("train")
            if n < 4:
                sys.exit(f"error: {location} holds {n} train sequences; the timed batches take 4")
            real = [rng.choice(n, 4, replace=False).tolist() for _ in range(64)]
            payload = sum(arr.nbytes_stored() for name, arr in store._root["train"].arrays() if name != "input_ids")
            r = time_reads(store, real, args.seconds)
            row = (f"{location} (d={store.hidden_size}, V={store.vocab_size:,})", store.codec.name,
                   payload / (n * store.seq_len), r["zarr"]["tok_s"], r["fast"]["tok_s"], r["fast"]["cores"])
            rows.append(row)
            print(f"\n{row[0]}: {row[1]} {row[2]:,.0f} B/token  zarr {row[3]:,.0f} tok/s  fast {row[4]:,.0f} tok/s "
                  f"({row[4] / row[3]:.1f}x, {row[5]:.2f} cores busy)", flush=True)

        print("\n| shapes | codec | stored B/token | zarr indexing tok/s | fast path tok/s | speed-up | cores busy |")
        print("|---|---|---|---|---|---|---|")
        for shape, name, bpt, z, f, cores in rows:
            print(f"| {shape} | {name} | {bpt:,.0f} | {z:,.0f} | {f:,.0f} | {f / z:.1f}x | {cores:.2f} |")

        if "overlap" in keep:
            # The training thread needs a core of its own: decode on the others (all of them on one core).
            threads = args.overlap_read_threads or max(1, len(os.sched_getaffinity(0)) - 1)
            with shards._pool_lock:
                if shards._pool is not None:
                    shards._pool.shutdown()
                shards._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="store-decode")
            store = open_store(str(keep["overlap"]))
            out = work / "overlap-run"
            R = read_seconds(store, batches)
            o = step_seconds(store, 0, 0.0, args.overlap_steps, out, read=False)
            print(f"\noverlap ({args.overlap_codec}, {args.overlap_shape} shapes, micro-batch of 4 x {L} tokens): "
                  f"R = {R * 1e3:.1f} ms to read one micro-batch; the loop's own host work o = {o * 1e3:.1f} ms "
                  f"(counted in C); {threads} decode thread(s)", flush=True)
            print("| C | inline reads (prefetch 0) | read ahead (prefetch 2) | max(C, R) | read ahead / max(C, R) |")
            print("|---|---|---|---|---|")
            for f in (0.5, 1.0, 2.0):
                C = f * R
                if C < o:
                    print(f"| {f:g}R = {C * 1e3:.1f} ms | below the loop's own {o * 1e3:.1f} ms: not measurable |")
                    continue
                inline = step_seconds(store, 0, C - o, args.overlap_steps, out)
                ahead = step_seconds(store, 2, C - o, args.overlap_steps, out)
                ideal = max(C, R)
                print(f"| {f:g}R = {C * 1e3:.1f} ms | {inline * 1e3:.1f} ms | {ahead * 1e3:.1f} ms | "
                      f"{ideal * 1e3:.1f} ms | {ahead / ideal:.3f} "
                      f"{'(within 5%)' if ahead <= 1.05 * ideal else '(NOT within 5%)'} |", flush=True)

            chunk = max(lay.chunk_bytes for lay in store._fast_layouts("train").values())
            ours, theirs = (checksum_contention(chunk, crc) for crc in (shards._crc, _google_crc))
            print(f"\ncontention: a thread launching small torch ops runs {ours:.2f}x slower while another thread "
                  f"checksums {chunk // 1024} KiB inner chunks (this store's) with crc32c (releases the GIL); "
                  f"{theirs:.0f}x with google-crc32c (holds it)", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
