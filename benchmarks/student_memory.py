"""Peak memory of the student's loss path, one KD micro-batch (forward + backward), fused against unfused.

Each case runs in a fresh process: the hidden states (N, d), the student head (V, d) with its gradient buffers and
the factored teacher's inputs (its hidden states and head) are allocated first; the figure is the growth of the
process's peak RSS (CPU) or of torch.cuda.max_memory_allocated (--cuda) during one forward + backward of the loss,
i.e. what the loss path holds above model, gradients and teacher inputs. It is printed beside one (N, V) fp32
tensor. The unfused path (the (N, V) logits and their gradient, tests/unfused.py) runs only where it fits in
--max-unfused-gib.

    python benchmarks/student_memory.py [--d 2048] [--vocab 128256,262144] [--tokens 4096,16384] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_case(path: str, N: int, d: int, V: int, chunk: int | None, cuda: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from distill_pipe.losses import head_loss
    from distill_pipe.student_head import HeadSpec
    from tests.unfused import hybrid_loss

    dev = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(N, d, generator=g)).to(dev).requires_grad_(True)
    W = (torch.randn(V, d, generator=g) * d**-0.5).to(dev).requires_grad_(True)
    h.grad, W.grad = torch.zeros_like(h), torch.zeros_like(W)  # the gradients exist before the step, as a model's
    h_t = torch.randn(N, d, generator=g).to(dev)
    W_t = (torch.randn(V, d, generator=g) * d**-0.5).to(dev)
    y = torch.randint(0, V, (N,), generator=g).to(dev)

    def teacher(s, e):  # the factored codec: h_t W_t^T per chunk
        return h_t[s:e] @ W_t.T

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak()
    if path == "fused":
        sums = head_loss(h, W, None, HeadSpec(V), y, teacher, alpha=0.5, temperature=2.0, chunk_size=chunk)
    else:
        sums = hybrid_loss(h @ W.T, y, teacher, alpha=0.5, temperature=2.0, chunk_size=chunk)
    sums.loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"path": path, "N": N, "d": d, "V": V, "loss_path_bytes": peak() - before, "NV_fp32_bytes": 4 * N * V,
            "loss": float(sums.loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--vocab", default="128256,262144")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the trainer's auto)")
    ap.add_argument("--max-unfused-gib", type=float, default=8.0,
                    help="run the unfused path only where ~3 (N, V) fp32 tensors fit in this")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        path, N, d, V = a.case.split(",")
        print(json.dumps(one_case(path, int(N), int(d), int(V), a.chunk_size, a.cuda)))
        return
    print(f"{'path':8} {'N':>6} {'d':>5} {'V':>7} {'loss path GiB':>14} {'(N,V) fp32 GiB':>15} {'ratio':>7}")
    for V in map(int, a.vocab.split(",")):
        for N in map(int, a.tokens.split(",")):
            for path in ("fused", "unfused"):
                if path == "unfused" and 3 * 4 * N * V / 2**30 > a.max_unfused_gib:
                    print(f"{path:8} {N:6} {a.d:5} {V:7}   not run: needs ~{3 * 4 * N * V / 2**30:.0f} GiB")
                    continue
                cmd = [sys.executable, __file__, "--case", f"{path},{N},{a.d},{V}"] + (["--cuda"] if a.cuda else [])
                if a.chunk_size:
                    cmd += ["--chunk-size", str(a.chunk_size)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
                gib, nv = r["loss_path_bytes"] / 2**30, r["NV_fp32_bytes"] / 2**30
                print(f"{path:8} {N:6} {a.d:5} {V:7} {gib:14.3f} {nv:15.3f} {gib / nv:7.3f}", flush=True)


if __name__ == "__main__":
    main()
