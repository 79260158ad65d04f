"""The `topk` codec: the k most likely ids, their T=1 logits, and the tail's mass (DistillKit's format, plus the tail).

Per position: `top_ids` (k) descending by probability, `top_logits` (k) fp16 r_i = z_i - max z (temperature 1,
so the top-k part at any T is r_i / T up to a constant), `tail_logmass` (2) fp16 = log of the mass outside the
top k at T = 1 and at the codec's `temperature` Ts (computed in fp32 from the full row, not as 1 - sum of
rounded probabilities). At T in {1, Ts} the target is a proper distribution over k + 1 outcomes:

    p_i = (1 - m_T) * softmax(r / T)_i over the k ids,   and one "rest" bucket of mass m_T.

The loss matches the bucket to the student's own mass outside the k ids (losses.py): KL over k + 1 outcomes,
exact, no guess about how the tail is shaped. Renormalising the top k instead (m -> 0) teaches the student
to put no mass outside them (overconfident, and biased wherever the tail is heavy); spreading m uniformly
over the other V - k tokens teaches it to raise tens of thousands of junk tokens. The bucket does neither and
costs one logsumexp per position.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distill_pipe.config import DIVERGENCES
from distill_pipe.losses import SparseTargets
from distill_pipe.store.codecs.base import PayloadSpec, blosc_shuffle, zstd_crc
from distill_pipe.store.codecs.sparse_base import SparseCodec


class TopKCodec(SparseCodec):
    """k: ids kept per position; temperature: Ts, the temperature (besides 1) whose tail mass is stored."""

    name = "topk"
    divergences = DIVERGENCES  # exact over the k + 1 outcomes: the k ids and the rest bucket
    ENCODE_ELEMENTS = 2**22

    def __init__(self, k: int = 32, temperature: float = 1.0, zstd_level: int = 9):
        super().__init__(temperature)
        if int(k) != k or k < 1:
            raise ValueError(f"topk: k must be an integer >= 1, got {k}")
        self.k = int(k)
        self.zstd_level = int(zstd_level)

    @property
    def params(self) -> dict:
        return {"k": self.k, "temperature": self.temperature, "zstd_level": self.zstd_level}

    def temperatures(self) -> tuple[float, ...]:
        return (1.0,) if self.temperature == 1.0 else (1.0, self.temperature)

    def payload_specs(self, vocab_size, hidden_size):
        if self.k > vocab_size:
            raise ValueError(f"topk: k={self.k} exceeds the vocabulary size {vocab_size}; lower k")
        self.vocab_size = vocab_size
        k = (self.k,)
        return {"top_ids": PayloadSpec(k, self.ids_dtype(vocab_size), (), zstd_crc(self.zstd_level)),
                "top_logits": PayloadSpec(k, np.dtype(np.float16), (), blosc_shuffle()),
                "tail_logmass": PayloadSpec((2,), np.dtype(np.float16), (), blosc_shuffle())}

    @torch.no_grad()
    def encode(self, x_BLX, rows=None):
        B, L, V = x_BLX.shape
        if self.k > V:
            raise ValueError(f"topk: k={self.k} exceeds the vocabulary size {V}; lower k")
        x_PV = x_BLX.reshape(B * L, V)
        dev, k, chunk = x_BLX.device, self.k, max(1, self.ENCODE_ELEMENTS // V)
        ids_PK = torch.empty((B * L, k), dtype=torch.int64, device=dev)
        r_PK = torch.empty((B * L, k), dtype=torch.float32, device=dev)
        tail_P2 = torch.empty((B * L, 2), dtype=torch.float32, device=dev)
        for s in range(0, B * L, chunk):
            z = x_PV[s:s + chunk].float()
            m = z.amax(-1, keepdim=True)
            if not torch.isfinite(m).all():
                raise ValueError("topk: the teacher's logits contain NaN, +inf or an all -inf row; "
                                 "check the teacher's dtype")
            top = torch.topk(z, k, -1)
            ids_PK[s:s + chunk] = top.indices
            r_PK[s:s + chunk] = top.values - m
            rest = z.scatter(1, top.indices, -math.inf)
            for j, T in enumerate((1.0, self.temperature)):
                tail_P2[s:s + chunk, j] = (rest / T).logsumexp(-1) - (z / T).logsumexp(-1)
        return {"top_ids": self.ids_to_payload(ids_PK, V).reshape(B, L, k),
                "top_logits": r_PK.to(torch.float16).reshape(B, L, k),
                "tail_logmass": tail_P2.to(torch.float16).reshape(B, L, 2)}

    def sparse_targets(self, payload, temperature: float) -> SparseTargets:
        self.require_temperature(temperature)
        j = 0 if abs(temperature - 1.0) <= 1e-6 else 1
        log_m_P = payload["tail_logmass"][:, j].float()
        log_top_PK = (payload["top_logits"].float() / temperature).log_softmax(-1)
        log_p_PK = log_top_PK + torch.log1p(-log_m_P.exp().clamp(max=1.0)).unsqueeze(1)  # (1 - m) * softmax
        p_PK, m_P = log_p_PK.exp(), log_m_P.exp()
        neg_entropy = (p_PK * log_p_PK).nan_to_num_(0.0).sum(-1) + (m_P * log_m_P).nan_to_num_(0.0)
        # the logs too: at low T, p underflows to 0 in fp32 where log p is finite (reverse KL reads log p)
        return SparseTargets(self.ids_from_payload(payload["top_ids"]), p_PK, m_P, neg_entropy, log_p_PK, log_m_P)

    def decode(self, payload, head):
        """logits l with softmax(l / Ts) = the top k exactly and the tail's mass spread evenly over the rest."""
        T = self.temperature
        t = self.sparse_targets(payload, T)
        V = self.decode_vocab()
        uniform = torch.log(t.rest_C / max(V - self.k, 1)).unsqueeze(1)  # -inf when the tail is empty
        out = uniform.expand(len(t), V).clone()
        out.scatter_(1, t.ids_CK, t.probs_CK.log())
        return out.mul_(T)

    def check_payload(self, payload):
        ids = payload["top_ids"].reshape(-1, self.k)
        r = payload["top_logits"].reshape(-1, self.k).astype(np.float32)
        tail = payload["tail_logmass"].reshape(-1, 2).astype(np.float32)
        if ids.size and (ids.min() < 0 or (self.vocab_size and ids.max() >= self.vocab_size)):
            return "top_ids holds ids outside the vocabulary"
        if r.size and (np.isnan(r).any() or (r[:, 0] != 0).any() or (r[:, 1:] > r[:, :-1]).any()):
            return "top_logits is not a descending row starting at 0 (the max) at every position"
        if np.isnan(tail).any() or (tail > 0).any():
            return "tail_logmass holds NaN or a mass above 1"
        return None
