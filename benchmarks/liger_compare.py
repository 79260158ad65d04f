"""Our fused head loss against liger-kernel's LigerFusedLinearJSDLoss: loss agreement, peak memory, time.

Both take the student's last hidden states and head weight and a factored teacher (its hidden states and head)
and never hold the (N, V) logits; liger's beta = 0 is forward KL(teacher || student) (its distillation_loss_fn:
F.kl_div(log p_student, log p_teacher, log_target=True)), which is our `forward_kl`. The losses differ in form:
liger returns a mean over the valid tokens, w_hard * CE + w_soft * KL_T, without the T^2 factor; ours is the
sum alpha * CE + (1 - alpha) * T^2 * KL_T. So liger runs with w_hard = alpha, w_soft = (1 - alpha) * T^2, and its
loss times the token count is compared with ours (and the head-weight gradients likewise).

Each case runs in a fresh process: inputs and .grad buffers are allocated first (gradients exist, as in
accumulation micro-batches 2..k), then one forward + backward; the figure is the growth of peak RSS above what
was resident before it, and its wall time. Cases take turns over --rounds rounds (interleaved), so a change in
machine load hits them alike; time is the best of the rounds, memory the largest.

    pip install --no-deps liger-kernel      # 0.8.5: pure PyTorch chunked losses, runs on CPU
    python benchmarks/liger_compare.py [--d 512] [--vocab 32000,128256] [--tokens 2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPHA, T = 0.5, 2.0


def _status_kib(key: str) -> int:
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))


def inputs(N: int, d: int, V: int):
    import torch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g).requires_grad_(True)
    W = torch.randn(V, d, generator=g).mul_(d**-0.5).requires_grad_(True)
    h_t = torch.randn(N, d, generator=g)
    W_t = torch.randn(V, d, generator=g).mul_(d**-0.5)
    y = torch.randint(0, V, (N,), generator=g)
    return h, W, h_t, W_t, y


def run_loss(impl: str, chunk: int | None, h, W, h_t, W_t, y):
    """(loss in our sum form, the loss tensor to backward)."""
    if impl == "ours":
        from distill_pipe.losses import head_loss
        from distill_pipe.student_head import HeadSpec

        sums = head_loss(h, W, None, HeadSpec(W.shape[0]), y, lambda s, e: h_t[s:e] @ W_t.T, alpha=ALPHA,
                         temperature=T, chunk_size=chunk)
        return sums.loss, sums.loss
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    fn = LigerFusedLinearJSDLoss(weight_hard_loss=ALPHA, weight_soft_loss=(1 - ALPHA) * T**2, beta=0.0,
                                 temperature=T, compiled=False, chunk_size=chunk)
    loss = fn(h, W, h_t, W_t, y)
    return loss * y.numel(), loss


def one_case(impl: str, N: int, d: int, V: int, chunk: int | None) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(2)
    h, W, h_t, W_t, y = inputs(N, d, V)
    h.grad, W.grad = torch.zeros_like(h), torch.zeros_like(W)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    before = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    loss_sum, loss = run_loss(impl, chunk, h, W, h_t, W_t, y)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"impl": impl, "chunk": chunk, "bytes": _status_kib("VmHWM") * 1024 - before, "s": seconds,
            "loss_sum": float(loss_sum), "gW_norm": float(W.grad.norm())}


def agreement(N: int, d: int, V: int, chunk: int) -> tuple[float, float]:
    """Relative differences of the loss (sum form) and of the head-weight gradient, ours against liger's."""
    sys.path.insert(0, str(ROOT))
    out = []
    for impl in ("ours", "liger"):
        h, W, h_t, W_t, y = inputs(N, d, V)
        loss_sum, _ = run_loss(impl, chunk if impl == "liger" else None, h, W, h_t, W_t, y)
        loss_sum.backward()  # liger's own loss is a mean: its gradients would be ours / N
        out.append((loss_sum.detach().double(), W.grad.double(), h.grad.double()))
    (l0, w0, h0), (l1, w1, h1) = out
    rel_loss = float((l0 - l1).abs() / l0.abs())
    rel_grad = max(float((a - b).norm() / a.norm()) for a, b in ((w0, w1), (h0, h1)))
    return rel_loss, rel_grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--vocab", default="32000,128256")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--liger-chunks", default="1024,256",
                    help="liger chunk sizes (rows) to run, comma-separated; 1024 is its default")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        impl, N, d, V, chunk = a.case.split(",")
        print(json.dumps(one_case(impl, int(N), int(d), int(V), int(chunk) if chunk != "auto" else None)))
        return
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        sys.exit("liger_kernel is not installed: pip install --no-deps liger-kernel (pure PyTorch on CPU), "
                 "then run this again")
    sys.path.insert(0, str(ROOT))
    from distill_pipe.losses import default_chunk_size

    N, d = a.tokens, a.d
    rel_loss, rel_grad = agreement(256, 64, 1000, 64)
    print(f"agreement at N=256, d=64, V=1000 (fp32): loss rel. diff {rel_loss:.1e}, "
          f"gradients (h, W) max rel. diff {rel_grad:.1e}")
    print(f"N={N}, d={d}, alpha={ALPHA}, T={T}, forward KL; .grad exists before the step; liger compiled=False; "
          f"best time / largest memory of {a.rounds} interleaved rounds")
    for V in map(int, a.vocab.split(",")):
        auto = default_chunk_size(V, "cpu")
        cases = [("ours", "auto")] + [("liger", c) for c in a.liger_chunks.split(",")]
        res: dict = {c: [] for c in cases}
        for _ in range(a.rounds):
            for impl, chunk in cases:
                cmd = [sys.executable, __file__, "--case", f"{impl},{N},{d},{V},{chunk}"]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(f"case {impl} chunk {chunk} failed: {p.stderr.strip().splitlines()[-1:]}")
                res[(impl, chunk)].append(json.loads(p.stdout.splitlines()[-1]))
        nv = 4 * N * V / 2**30
        ours = res[("ours", "auto")]
        t_ours = min(r["s"] for r in ours)
        print(f"\nV={V} (one (N, V) fp32 = {nv:.3f} GiB; our auto chunk = {auto} rows)")
        print("| impl | chunk rows | peak growth GiB | x (N,V) fp32 | s per fwd+bwd (best) | vs ours | loss sum |")
        print("|---|---|---|---|---|---|---|")
        for (impl, chunk), rs in res.items():
            gib = max(r["bytes"] for r in rs) / 2**30
            t = min(r["s"] for r in rs)
            shown = f"{auto} (auto)" if chunk == "auto" else chunk
            print(f"| {impl} | {shown} | {gib:.3f} | {gib / nv:.3f} | {t:.2f} | {t / t_ours:.2f}x "
                  f"| {rs[0]['loss_sum']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
