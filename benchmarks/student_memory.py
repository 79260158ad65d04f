"""Peak memory of the student's loss path, one KD micro-batch (forward + backward), fused against unfused.

Each case runs in a fresh process: the hidden states (N, d), the student head (V, d) with its gradient buffers and
the factored teacher's inputs (its hidden states and head) are allocated first; the figure is the growth of the
process's peak RSS (CPU) or of torch.cuda.max_memory_allocated (--cuda) during one forward + backward of the loss.
It is printed beside one (N, V) fp32 tensor. The unfused path (the (N, V) logits and their gradient,
tests/unfused.py) runs only where it fits in --max-unfused-gib.

Two gradient states, one row each (--grads):
  - existing: h.grad and W.grad are allocated before the step (micro-batches 2..k of gradient accumulation);
    the growth is what the loss path holds above model, gradients and teacher inputs.
  - none: no .grad before the step (the first micro-batch after zero_grad(set_to_none=True), as the trainer
    does); the growth includes the gradients the step creates (autograd keeps the returned fp32 buffer as
    .grad without a copy), so the row also prints the growth minus the .grad tensors created.
The fused path runs as the train stage calls it (--head-grad sink: grad_scale given, the head's gradient added
into W.grad inside the chunk loop); --head-grad autograd runs it without grad_scale (an fp32 (V, d) buffer held
from forward to backward and handed to autograd, which adds it into W.grad: the public API under DDP and
Hugging Face's Trainer). --dtype bfloat16 makes h and W bf16 (a bf16 student without fp32 master weights): the fused path then holds
an fp32 copy of W and its fp32 gradient buffer, cast to bf16 on return.

    python benchmarks/student_memory.py [--d 2048] [--vocab 128256,262144] [--tokens 4096,16384]
        [--grads none,existing] [--dtype float32] [--head-grad sink|autograd] [--softcap CAP] [--autocast]
        [--cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(key: str) -> int:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))


def one_case(path: str, N: int, d: int, V: int, chunk: int | None, cuda: bool, grads: str, dtype: str,
             head_grad: str = "sink", softcap: float | None = None, autocast: bool = False) -> dict:
    import contextlib

    import torch

    sys.path.insert(0, str(ROOT))
    dev = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, dtype)
    h = (torch.randn(N, d, generator=g)).to(dev, dt).requires_grad_(True)
    W = torch.randn(V, d, generator=g).mul_(d**-0.5).to(dev, dt).requires_grad_(True)
    if grads == "existing":  # the gradients exist before the step, as in accumulation micro-batches 2..k
        h.grad, W.grad = torch.zeros_like(h), torch.zeros_like(W)
    h_t = torch.randn(N, d, generator=g).to(dev)
    W_t = torch.randn(V, d, generator=g).mul_(d**-0.5).to(dev)
    y = torch.randint(0, V, (N,), generator=g).to(dev)

    def teacher(s, e):  # the factored codec: h_t W_t^T per chunk
        return h_t[s:e] @ W_t.T

    def peak() -> int:
        if cuda:
            return torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024

    # From what is resident now, not from the peak so far: setup's temporaries (e.g. randn before the scaling)
    # would otherwise hide the first GiBs of the loss path. clear_refs 5 resets VmHWM to the current RSS.
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS") * 1024
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        sums = _loss(path, h, W, V, y, teacher, chunk, head_grad, softcap)
    sums.loss.backward()
    if cuda:
        torch.cuda.synchronize()
    created = 0 if grads == "existing" else sum(t.grad.nbytes for t in (h, W))
    return {"path": path, "N": N, "d": d, "V": V, "loss_path_bytes": peak() - before, "NV_fp32_bytes": 4 * N * V,
            "grads_created_bytes": created, "loss": float(sums.loss)}


def _loss(path, h, W, V, y, teacher, chunk, head_grad, softcap):
    import torch

    from distill_pipe.losses import head_loss
    from distill_pipe.student_head import HeadSpec
    from tests.unfused import hybrid_loss

    if path == "fused":
        return head_loss(h, W, None, HeadSpec(V, softcap=softcap), y, teacher, alpha=0.5, temperature=2.0,
                         chunk_size=chunk, grad_scale=1.0 if head_grad == "sink" else None)
    z = (h @ W.T).float()
    return hybrid_loss(z if softcap is None else softcap * torch.tanh(z / softcap), y, teacher, alpha=0.5,
                       temperature=2.0, chunk_size=chunk)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--vocab", default="128256,262144")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: the trainer's auto)")
    ap.add_argument("--max-unfused-gib", type=float, default=8.0,
                    help="run the unfused path only where ~3 (N, V) fp32 tensors fit in this")
    ap.add_argument("--grads", default="none,existing",
                    help="gradient states to run, comma-separated: none (no .grad before the step), existing")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="dtype of h and W")
    ap.add_argument("--paths", default="fused,unfused", help="loss paths to run, comma-separated")
    ap.add_argument("--head-grad", default="sink", choices=("sink", "autograd"),
                    help="fused path: head gradient into W.grad in the loop (the train stage) or via autograd")
    ap.add_argument("--autocast", action="store_true", help="run the loss under bf16 autocast")
    ap.add_argument("--softcap", type=float, default=None, help="a final soft-cap on the student's logits (Gemma 2/3)")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        path, N, d, V, grads = a.case.split(",")
        print(json.dumps(one_case(path, int(N), int(d), int(V), a.chunk_size, a.cuda, grads, a.dtype, a.head_grad,
                                  a.softcap, a.autocast)))
        return
    grad_modes = a.grads.split(",")
    if not grad_modes or set(grad_modes) - {"none", "existing"}:
        sys.exit(f"error: --grads takes none and/or existing, comma-separated; got {a.grads!r}")
    loss_paths = a.paths.split(",")
    if not loss_paths or set(loss_paths) - {"fused", "unfused"}:
        sys.exit(f"error: --paths takes fused and/or unfused, comma-separated; got {a.paths!r}")
    head_grad = a.head_grad if a.dtype == "float32" else "autograd (a bf16 head cannot take the sink)"
    print(f"dtype {a.dtype}; fused head gradient: {head_grad}; softcap {a.softcap}; autocast {a.autocast}; growth of peak {'CUDA memory' if a.cuda else 'RSS'} in one forward + backward")
    print(f"{'path':8} {'.grad':8} {'N':>6} {'d':>5} {'V':>7} {'growth GiB':>11} {'-.grad GiB':>11} "
          f"{'(N,V) fp32 GiB':>15} {'ratio':>7} {'ratio-.grad':>12} {'s':>6}")
    for V in map(int, a.vocab.split(",")):
        for N in map(int, a.tokens.split(",")):
            for path in loss_paths:
                for grads in grad_modes:
                    if path == "unfused" and 3 * 4 * N * V / 2**30 > a.max_unfused_gib:
                        print(f"{path:8} {grads:8} {N:6} {a.d:5} {V:7}   not run: needs "
                              f"~{3 * 4 * N * V / 2**30:.0f} GiB > --max-unfused-gib {a.max_unfused_gib:g}")
                        continue
                    cmd = [sys.executable, __file__, "--case", f"{path},{N},{a.d},{V},{grads}", "--dtype", a.dtype,
                           "--head-grad", a.head_grad] + (["--softcap", str(a.softcap)] if a.softcap else []) + \
                        (["--autocast"] if a.autocast else [])
                    cmd += (["--cuda"] if a.cuda else []) + (["--chunk-size", str(a.chunk_size)] if a.chunk_size else [])
                    t0 = time.perf_counter()
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    r, s = json.loads(out.splitlines()[-1]), time.perf_counter() - t0
                    gib, nv = r["loss_path_bytes"] / 2**30, r["NV_fp32_bytes"] / 2**30
                    net = gib - r["grads_created_bytes"] / 2**30
                    print(f"{path:8} {grads:8} {N:6} {a.d:5} {V:7} {gib:11.3f} {net:11.3f} {nv:15.3f} "
                          f"{gib / nv:7.3f} {net / nv:12.3f} {s:6.0f}", flush=True)


if __name__ == "__main__":
    main()
