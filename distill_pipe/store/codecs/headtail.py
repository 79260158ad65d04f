"""The `headtail` codec: the teacher's m most likely tokens exactly, and n draws from the rest of its mass.

Per position, at the codec's temperature Ts (p = softmax(z / Ts)):

- the head: `head_ids` (m) the m most likely ids, descending, and `head_logprobs` (m) fp16 = their log p;
- the tail: n draws x_1..x_n with replacement from the tail renormalised, p_v / M for v outside the head, where
  M = sum of p outside the head, kept as unique ids (ascending) with counts in n slots (`tail_ids`,
  `tail_counts`; unused slots have count 0 and id 0), as the `sampled` codec keeps its draws;
- `stats` (2) fp16 = (log M, the teacher's entropy H(p)), both computed in fp32 from the whole row.

The target: w_i = (1 - M) softmax(head_logprobs)_i at the head's ids (the head's log-probs renormalised to the
head's stored mass, so the target sums to 1 whatever the fp16 rounding) and w_x = M * count_x / n at the tail's
draws. E[count_x / n] = p_x / M, so E[w_v] = p_v for every token: an unbiased estimate of the whole distribution
(of the stored one: the teacher's up to the fp16 rounding of the head's log-probs and of log M, 2^-11 of each
log), and the forward-KL gradient sum_v w_v (q_v - onehot(v)) / T is unbiased for the dense one.

Why it beats `sampled` at equal bytes: for one position the estimate's variance is sum_v Var(w_v) =
(1 - sum_v p_v^2) / n for n pure draws, and (M^2 - sum_tail p_v^2) / n for the tail's draws here: the head, where
the teacher's mass and most of the draws' variance sit (the top 32 of SmolLM2 hold 0.87 of the mass), costs no
variance at all. Only forward KL is linear in the target and stays unbiased (as for `sampled`), and the draws
hold the teacher at Ts only. When the head holds everything (M = 0: V = m, or a masked vocabulary), no draw is
made and every tail slot is empty.

Defaults m=4, n=16, by measurement (benchmarks/store_sizes.py, 2026-12-02): among the (m, n) in {4, 8, 12, 16} x
{4, 8, 16} whose payload is <= 64 B/token on disk at V=128,256 (a tiny Llama matched to SmolLM2's entropy and
top-1 mass, 512 tokens), the lowest sum_v Var(w_v) on SmolLM2-135M's own distributions at T=1 (pydoc): m=4 n=16
0.0110 at 53 B/token, m=12 n=8 0.0112 at 63, m=8 n=8 0.0144 at 51, m=8 n=4 0.0288 at 41; sampled n=32 0.0213 at 40.
"""

from __future__ import annotations

import numpy as np
import torch

from distill_pipe.losses import SparseTargets
from distill_pipe.store.codecs.base import PayloadSpec, blosc_shuffle, zstd_crc
from distill_pipe.store.codecs.sampled import SampledCodec

NEG_INF = float("-inf")


class HeadTailCodec(SampledCodec):
    """head: m tokens kept exactly per position; draws: n draws from the rest (1..255); temperature: Ts; seed: the
    draws' seed (with the sequence's name, as for `sampled`)."""

    name = "headtail"

    def __init__(self, head: int = 4, draws: int = 16, temperature: float = 1.0, seed: int = 0, zstd_level: int = 9):
        if int(head) != head or head < 1:
            raise ValueError(f"headtail: head must be an integer >= 1, got {head}")
        if int(draws) != draws or not 1 <= draws <= 255:
            raise ValueError(f"headtail: draws must be an integer in 1..255 (counts are uint8), got {draws}")
        super().__init__(draws=draws, temperature=temperature, seed=seed, zstd_level=zstd_level)
        self.head = int(head)

    @property
    def params(self) -> dict:
        return {"head": self.head, "draws": self.draws, "temperature": self.temperature, "seed": self.seed,
                "zstd_level": self.zstd_level}

    def _check_vocab(self, vocab_size: int) -> None:
        if self.head > vocab_size:
            raise ValueError(f"headtail: head={self.head} exceeds the vocabulary size {vocab_size}; lower head")

    def payload_specs(self, vocab_size, hidden_size):
        self._check_vocab(vocab_size)
        self.vocab_size = vocab_size
        ids, zstd = self.ids_dtype(vocab_size), zstd_crc(self.zstd_level)
        return {"head_ids": PayloadSpec((self.head,), ids, (), zstd),
                "head_logprobs": PayloadSpec((self.head,), np.dtype(np.float16), (), blosc_shuffle()),
                "tail_ids": PayloadSpec((self.draws,), ids, (), zstd),
                "tail_counts": PayloadSpec((self.draws,), np.dtype(np.uint8), (), zstd),
                "stats": PayloadSpec((2,), np.dtype(np.float16), (), blosc_shuffle())}

    @torch.no_grad()
    def encode(self, x_BLX, rows=None):
        B, L, V = x_BLX.shape
        self._check_vocab(V)
        dev, m, n, P = x_BLX.device, self.head, self.draws, B * L
        out = {"head_ids": torch.zeros((P, m), dtype=torch.int64, device=dev),
               "head_logprobs": torch.empty((P, m), dtype=torch.float32, device=dev),
               "tail_ids": torch.zeros((P, n), dtype=torch.int64, device=dev),
               "tail_counts": torch.zeros((P, n), dtype=torch.int64, device=dev),
               "stats": torch.empty((P, 2), dtype=torch.float32, device=dev)}
        for b0, b1, gen in self._groups(B, rows, dev):
            self._fill(x_BLX[b0:b1].reshape(-1, V), gen, {k: v[b0 * L:b1 * L] for k, v in out.items()})
        return {"head_ids": self.ids_to_payload(out["head_ids"], V).reshape(B, L, m),
                "head_logprobs": out["head_logprobs"].to(torch.float16).reshape(B, L, m),
                "tail_ids": self.ids_to_payload(out["tail_ids"], V).reshape(B, L, n),
                "tail_counts": out["tail_counts"].to(torch.uint8).reshape(B, L, n),
                "stats": out["stats"].to(torch.float16).reshape(B, L, 2)}

    def _fill(self, x_PV, gen, out) -> None:
        """Fill the (P, ...) views in `out` from logits (P, V), chunk by chunk."""
        for s, chunk, logp in self._log_probs_in_chunks(x_PV):
            top = logp.topk(self.head, -1)
            tail = logp.scatter(1, top.indices, NEG_INF)  # log p outside the head
            log_mass = tail.logsumexp(-1)  # -inf where the head holds everything
            out["head_ids"][s:s + chunk] = top.indices
            out["head_logprobs"][s:s + chunk] = top.values
            out["stats"][s:s + chunk, 0] = log_mass
            out["stats"][s:s + chunk, 1] = -(logp.exp() * logp).nan_to_num_(0.0).sum(-1)  # 0 * -inf = 0
            has_tail = torch.isfinite(log_mass)
            # the tail renormalised in log space (no underflow however small M is); rows without a tail draw from
            # a stand-in (token 0) and keep no draw
            p_tail = (tail - log_mass.unsqueeze(1)).exp().masked_fill_(~has_tail.unsqueeze(1), 0.0)
            p_tail[:, 0].masked_fill_(~has_tail, 1.0)
            draws_cn = torch.multinomial(p_tail, self.draws, replacement=True, generator=gen)
            ids_cS, counts_cS = out["tail_ids"][s:s + chunk], out["tail_counts"][s:s + chunk]
            self.unique_with_counts(draws_cn, ids_cS, counts_cS)
            ids_cS.masked_fill_(~has_tail.unsqueeze(1), 0)
            counts_cS.masked_fill_(~has_tail.unsqueeze(1), 0)

    def sparse_targets(self, payload, temperature: float) -> SparseTargets:
        self.require_temperature(temperature)
        log_m_P = payload["stats"][:, 0].float().clamp(max=0.0)
        log_head_PM = payload["head_logprobs"].float().log_softmax(-1) + torch.log1p(-log_m_P.exp()).unsqueeze(1)
        log_tail_PN = (payload["tail_counts"].float() / self.draws).log() + log_m_P.unsqueeze(1)  # count 0: -inf
        log_p_PK = torch.cat([log_head_PM, log_tail_PN], 1)
        ids_PK = torch.cat([self.ids_from_payload(payload["head_ids"]), self.ids_from_payload(payload["tail_ids"])], 1)
        return SparseTargets(ids_PK, log_p_PK.exp(), None, -payload["stats"][:, 1].float(), log_p_PK)

    def check_payload(self, payload):
        lp = payload["head_logprobs"].reshape(-1, self.head).astype(np.float32)
        c = payload["tail_counts"].reshape(-1, self.draws).astype(np.int64)
        stats = payload["stats"].reshape(-1, 2).astype(np.float32)
        for name in ("head_ids", "tail_ids"):
            ids = payload[name]
            if ids.size and (ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size)):
                return f"{name} holds ids outside the vocabulary"
        if lp.size and (np.isnan(lp).any() or (lp > 0).any() or (lp[:, 1:] > lp[:, :-1]).any()):
            return "head_logprobs is not a descending row of log-probabilities at every position"
        if np.isnan(stats).any() or (stats[:, 0] > 0).any():
            return "stats holds NaN or a tail mass above 1"
        want = np.where(np.isneginf(stats[:, 0]), 0, self.draws)
        if c.size and (c.sum(-1) != want).any():
            return f"tail_counts do not sum to draws={self.draws} at every position with a tail (0 without)"
        return None

