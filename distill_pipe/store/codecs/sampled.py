"""The `sampled` codec: tokens drawn from the teacher at temperature Ts, stored as unique ids with counts.

Per position, `draws` = n tokens x_1..x_n ~ p_Ts = softmax(z / Ts) (with replacement), kept as their unique ids
(ascending) and counts, in `slots` = n fixed slots (a position has at most n unique ids; unused slots have
count 0 and id 0), plus the teacher's entropy H(p_Ts) in fp16. The target w = counts / n has E[w] = p_Ts, so
the loss's gradient sum_k w_k (q_Ts - onehot(x_k)) is an unbiased estimate of the dense KL gradient
(q_Ts - p_Ts) ("random-sampling KD", Anshumann et al., ACL 2025); the stored entropy makes the KL value an
unbiased estimate too. Bytes/token depend on n and the vocabulary's id width, never on the hidden size.

Draws come from one generator per codec object seeded with `seed`: independent across positions, not tied to
a position (a resumed or multi-rank store draws other, equally valid, samples).
"""

from __future__ import annotations

import numpy as np
import torch

from distill_pipe.losses import SparseTargets
from distill_pipe.store.codecs.base import PayloadSpec, blosc_shuffle, zstd_crc
from distill_pipe.store.codecs.sparse_base import SparseCodec


class SampledCodec(SparseCodec):
    """draws: tokens drawn per position (1..255, counts are uint8); temperature: Ts; seed: the draws' seed."""

    name = "sampled"
    ENCODE_ELEMENTS = 2**22  # (chunk, V) elements per encode step

    def __init__(self, draws: int = 32, temperature: float = 1.0, seed: int = 0, zstd_level: int = 9):
        super().__init__(temperature)
        if int(draws) != draws or not 1 <= draws <= 255:
            raise ValueError(f"sampled: draws must be an integer in 1..255 (counts are uint8), got {draws}")
        self.draws = int(draws)
        self.seed = int(seed)
        self.zstd_level = int(zstd_level)
        self._generators: dict[str, torch.Generator] = {}

    @property
    def params(self) -> dict:
        return {"draws": self.draws, "temperature": self.temperature, "seed": self.seed,
                "zstd_level": self.zstd_level}

    def payload_specs(self, vocab_size, hidden_size):
        self.vocab_size = vocab_size
        n = (self.draws,)
        return {"sample_ids": PayloadSpec(n, self.ids_dtype(vocab_size), (), zstd_crc(self.zstd_level)),
                "sample_counts": PayloadSpec(n, np.dtype(np.uint8), (), zstd_crc(self.zstd_level)),
                "entropy": PayloadSpec((1,), np.dtype(np.float16), (), blosc_shuffle())}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @torch.no_grad()
    def encode(self, x_BLX):
        B, L, V = x_BLX.shape
        x_PV = x_BLX.reshape(B * L, V)
        dev, n, chunk = x_BLX.device, self.draws, max(1, self.ENCODE_ELEMENTS // V)
        ids_PS = torch.zeros((B * L, n), dtype=torch.int64, device=dev)
        counts_PS = torch.zeros((B * L, n), dtype=torch.int64, device=dev)
        entropy_P = torch.empty(B * L, dtype=torch.float32, device=dev)
        gen = self._generator(dev)
        for s in range(0, B * L, chunk):
            z = x_PV[s:s + chunk].float()
            if torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all(-1).any():
                raise ValueError("sampled: the teacher's logits contain NaN, +inf or an all -inf row; "
                                 "check the teacher's dtype")
            logp = (z / self.temperature).log_softmax(-1)
            p = logp.exp()
            entropy_P[s:s + chunk] = -(p * logp).nan_to_num_(0.0).sum(-1)  # 0 * -inf = 0
            draws_cn = torch.multinomial(p, n, replacement=True, generator=gen).sort(-1).values
            new = torch.ones_like(draws_cn, dtype=torch.bool)
            new[:, 1:] = draws_cn[:, 1:] != draws_cn[:, :-1]
            slot = new.long().cumsum(-1) - 1  # (c, n): the unique id's slot of each draw
            ids_PS[s:s + chunk].scatter_(1, slot, draws_cn)
            counts_PS[s:s + chunk].scatter_add_(1, slot, torch.ones_like(slot))
        return {"sample_ids": self.ids_to_payload(ids_PS, V).reshape(B, L, n),
                "sample_counts": counts_PS.to(torch.uint8).reshape(B, L, n),
                "entropy": entropy_P.to(torch.float16).reshape(B, L, 1)}

    def sparse_targets(self, payload, temperature: float) -> SparseTargets:
        self.require_temperature(temperature)
        ids = self.ids_from_payload(payload["sample_ids"])
        w = payload["sample_counts"].float() / self.draws
        return SparseTargets(ids, w, None, -payload["entropy"].float().squeeze(-1))

    def decode(self, payload, head):
        """logits l with softmax(l / Ts) = counts / draws (the draws' empirical distribution); -inf elsewhere."""
        t = self.sparse_targets(payload, self.temperature)
        V = self.decode_vocab()
        w = torch.zeros((len(t), V), dtype=torch.float32, device=t.ids_CK.device)
        w.scatter_add_(1, t.ids_CK, t.probs_CK)
        return w.log_().mul_(self.temperature)

    def check_payload(self, payload):
        c = payload["sample_counts"].reshape(-1, self.draws).astype(np.int64)
        if c.size and (c.sum(-1) != self.draws).any():
            return f"sample_counts do not sum to draws={self.draws} at every position"
        return None
