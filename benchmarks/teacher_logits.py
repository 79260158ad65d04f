"""Stage one's throughput against a pure forward pass of the same teacher on the same batches.

    python benchmarks/teacher_logits.py [--sequences 8] [--seq-len 256] [--batch-size 4] [--dtype float32]

For each codec, in one process and on the same batches: the pure forward (the exact call the stage makes,
nothing stored) and the stage's compute loop (forward + encode on the teacher's device + copy to CPU +
the background shard writer), each timed `--repeats` times, best taken. The ratio stage/pure is the
figure docs/benchmarks.md quotes; the target is >= 0.9 (the writer overlaps the compute).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def corpus_ids(tok, n: int, seq_len: int) -> np.ndarray:
    from pydoc_data.topics import topics

    stream = []
    for text in topics.values():
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(stream) >= n * seq_len:
            break
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="builtin:smollm2-135m")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--codecs", default="factored,dense-u8,dense-bf16")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from distill_pipe import models
    from distill_pipe.distributed import DistInfo
    from distill_pipe.store import create_store, head_from_model, make_codec, open_store
    from distill_pipe.teacher import _capture_hidden, _compute

    dtype = models.DTYPES[args.dtype]
    model = models.load_causal_lm(args.teacher, dtype=torch.float32)
    head = head_from_model(model)
    model = model.to(dtype)
    tok = models.load_tokenizer(args.teacher)
    ids = corpus_ids(tok, args.sequences, args.seq_len)
    n_tok = ids.size
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    print(f"# {args.teacher} {args.dtype}, {args.sequences} x {args.seq_len} tokens, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"| codec | pure forward tok/s | stage tok/s | stage / pure | stage bytes/token |")
    print("|---|---|---|---|---|")
    for name in args.codecs.split(","):
        codec = make_codec(name)
        keep = 1 if codec.input_kind == "hidden" else 0

        def pure() -> float:
            t = time.perf_counter()
            with torch.inference_mode(), _capture_hidden(model):
                for s in range(0, len(ids), args.batch_size):
                    model(torch.as_tensor(ids[s : s + args.batch_size], dtype=torch.long), logits_to_keep=keep)
            return time.perf_counter() - t

        def stage() -> tuple[float, int]:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "logits.zarr")
                create_store(path, attrs={}, splits={"train": ids}, codec=codec, shard_size=args.shard_size,
                             vocab_size=head["weight"].shape[0], hidden_size=head["weight"].shape[1],
                             head=head if codec.input_kind == "hidden" else None)
                store = open_store(path, mode="r+")
                jobs = [("train", k) for k in range(store.num_shards("train"))]
                t = time.perf_counter()
                _compute(model, store, codec, jobs, args.batch_size, dist, args.seq_len)
                elapsed = time.perf_counter() - t
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(path, "train"))
                           for f in fs if "input_ids" not in d)
                return elapsed, size

        pure()  # warm-up: first-call allocations and kernels
        t_pure, t_stage, size = [], [], 0
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            t_pure.append(pure())
            elapsed, size = stage()
            t_stage.append(elapsed)
        rp, rs = n_tok / min(t_pure), n_tok / min(t_stage)
        print(f"| {name} | {rp:,.0f} | {rs:,.0f} | {rs / rp:.3f} | {size / n_tok:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
