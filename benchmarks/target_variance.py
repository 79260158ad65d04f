"""Bias and variance of the sparse stores' targets on the builtin teacher's own distributions, at the training T.

For each position i of the pydoc corpus the fp32 teacher gives p_i = softmax(z_i / T); a sparse codec's decoded
target w_i (the weights the loss uses) is an estimate of p_i. For a fixed, arbitrary student q_i (the teacher's
logits at another temperature plus noise), d_i = sum_v w_iv log q_iv - sum_v p_iv log q_iv is the error of the
cross-entropy term the forward-KL loss differentiates. Printed per codec setting and seed: mean d (an unbiased
target gives 0 within its standard error) and Var(d) (what a step's gradient noise scales with), on the same
positions for every setting, so settings of equal bytes compare directly. Beside them, the closed form of the
gradient's variance per position, sum_v Var(w_v): (1 - sum p^2) / n for n pure draws, (M^2 - sum_tail p^2) / n
for headtail (M: the mass outside its m most likely tokens), averaged over the positions.

    python benchmarks/target_variance.py [--tokens 2048] [--temperature 2] [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from distill_pipe import models  # noqa: E402
from distill_pipe.store import make_codec  # noqa: E402
from store_sizes import codecs_bench  # noqa: E402

SETTINGS = [("sampled", {"draws": 16}), ("sampled", {"draws": 32}), ("headtail", {"head": 4, "draws": 8}),
            ("headtail", {"head": 4, "draws": 16}), ("headtail", {"head": 8, "draws": 8})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="positions (a multiple of 256)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=3, help="independent encodings per setting")
    a = ap.parse_args()
    src = models.resolve("builtin:smollm2-135m")
    tok = models.load_tokenizer(src)
    teacher = models.load_causal_lm(src, dtype=torch.float32).eval()
    ids = torch.tensor(codecs_bench().corpus_ids(tok, a.tokens)).reshape(-1, 256)
    with torch.no_grad():
        z = torch.cat([teacher(input_ids=ids[i:i + 2]).logits for i in range(0, len(ids), 2)])
    T, V = a.temperature, z.shape[-1]
    p = (z / T).log_softmax(-1).reshape(-1, V).double().exp()
    g = torch.Generator().manual_seed(0)
    q = (z / 1.3 + torch.randn(z.shape, generator=g) * 0.5).reshape(-1, V).double().log_softmax(-1)
    exact = (p * q).sum(-1)
    print(f"builtin teacher, {len(exact)} pydoc positions, T={T}; d = sum w log q - sum p log q per position")
    print(f"{'setting':24} {'seed':>4} {'mean d':>9} {'SE':>8} {'Var(d)':>8} {'sum Var(w)':>10}")
    sq = (p * p).sum(-1)
    for name, params in SETTINGS:
        if name == "sampled":
            closed = float(((1 - sq) / params["draws"]).mean())
        else:
            head = p.topk(params["head"], -1).values
            closed = float((((1 - head.sum(-1)) ** 2 - (sq - (head * head).sum(-1))) / params["draws"]).mean())
        for seed in range(a.seeds):
            codec = make_codec(name, temperature=T, seed=seed, **params)
            codec.payload_specs(V, None)
            payload = {k: torch.as_tensor(v).reshape(-1, *v.shape[2:]) for k, v in codec.encode(z).items()}
            t = codec.sparse_targets(payload, T)
            d = (t.probs_CK.double() * q.gather(1, t.ids_CK)).sum(-1) - exact
            label = f"{name} " + " ".join(f"{k}={v}" for k, v in params.items())
            print(f"{label:24} {seed:4} {float(d.mean()):+9.5f} {float(d.std()) / math.sqrt(len(d)):8.5f} "
                  f"{float(d.var()):8.4f} {closed:10.4f}", flush=True)


if __name__ == "__main__":
    main()
