"""Hybrid loss: chunked `hybrid_loss` against the vanilla autograd formulation, forward + backward.

    python benchmarks/losses.py [--positions 1024] [--vocab 49152] [--chunk-size 1024]

Prints milliseconds per step and the largest fp32 tensor each formulation creates (a proxy for its
peak extra memory: vanilla holds several (N, V) fp32 tensors for backward, chunked only (C, V)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill_pipe.losses import IGNORE_INDEX

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.unfused import hybrid_loss  # noqa: E402 - the chunked loss over (N, V) logits (the fused path's reference)


class LargestFp32(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


def vanilla(z_NV, targets_N, teacher_NV, alpha, T):
    keep = targets_N != IGNORE_INDEX
    z = z_NV[keep].float()
    ce = F.cross_entropy(z, targets_N[keep], reduction="sum")
    log_p = F.log_softmax(teacher_NV[keep] / T, -1)
    kl = F.kl_div(F.log_softmax(z / T, -1), log_p, log_target=True, reduction="sum")
    return alpha * ce + (1 - alpha) * T * T * kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)
    N, V = args.positions, args.vocab
    student_NV = (torch.randn(N, V, generator=g, device=device) * 2).bfloat16()
    teacher_NV = torch.randn(N, V, generator=g, device=device) * 3
    targets_N = torch.randint(0, V, (N,), generator=g, device=device)

    def run_chunked(z):
        return hybrid_loss(z, targets_N, lambda s, e: teacher_NV[s:e], alpha=0.5, temperature=2.0,
                           chunk_size=args.chunk_size).loss

    def run_vanilla(z):
        return vanilla(z, targets_N, teacher_NV, 0.5, 2.0)

    print(f"device={device} N={N} V={V} chunk={args.chunk_size} student=bf16 threads={torch.get_num_threads()}")
    for name, fn in (("chunked", run_chunked), ("vanilla", run_vanilla)):
        z = student_NV.clone().requires_grad_(True)
        with LargestFp32() as mode:
            (fn(z) / N).backward()
        times = []
        for _ in range(args.repeats):
            z.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            (fn(z) / N).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"{name:8s} {1000 * min(times):8.1f} ms/step   largest fp32 tensor "
              f"{mode.numel * 4 / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
