"""The `sampled` codec: tokens drawn from the teacher at temperature Ts, stored as unique ids with counts.

Per position, `draws` = n tokens x_1..x_n ~ p_Ts = softmax(z / Ts) (with replacement), kept as their unique ids
(ascending) and counts, in `slots` = n fixed slots (a position has at most n unique ids; unused slots have
count 0 and id 0), plus the teacher's entropy H(p_Ts) in fp16. The target w = counts / n has E[w] = p_Ts, so
the loss's gradient sum_k w_k (q_Ts - onehot(x_k)) is an unbiased estimate of the dense KL gradient
(q_Ts - p_Ts) ("random-sampling KD", Anshumann et al., ACL 2025); the stored entropy makes the KL value an
unbiased estimate too. Bytes/token depend on n and the vocabulary's id width, never on the hidden size.

Each sequence's draws come from a generator seeded with `seed` and the sequence's name ("split/index", passed
by the teacher stage as `rows`), so a store that was resumed, repaired, re-batched or computed by several ranks
holds the same draws as one uninterrupted run (given the same teacher logits). Without `rows` (benchmarks,
tests) one generator per codec object is used.
"""

from __future__ import annotations

import hashlib

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

    def _row_generator(self, device: torch.device, row: str) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}\0{row}".encode(), digest_size=8).digest()
        return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)

    def _groups(self, B: int, rows, device) -> list[tuple[int, int, torch.Generator]]:
        """(first, end, generator) of the batch's sequences: with `rows` one generator per sequence, seeded by its
        name; else the codec's own generator over the whole batch."""
        if rows is None:
            return [(0, B, self._generator(device))]
        if len(rows) != B:
            raise ValueError(f"{self.name}: {len(rows)} row names for {B} sequences")
        return [(b, b + 1, self._row_generator(device, rows[b])) for b in range(B)]

    @staticmethod
    def unique_with_counts(draws_cn: torch.Tensor, ids_cS: torch.Tensor, counts_cS: torch.Tensor) -> None:
        """Drawn ids (c, n) -> their unique ids, ascending, and counts written into the zeroed (c, n) views."""
        draws_cn = draws_cn.sort(-1).values
        new = torch.ones_like(draws_cn, dtype=torch.bool)
        new[:, 1:] = draws_cn[:, 1:] != draws_cn[:, :-1]
        slot = new.long().cumsum(-1) - 1  # (c, n): the unique id's slot of each draw
        ids_cS.scatter_(1, slot, draws_cn)
        counts_cS.scatter_add_(1, slot, torch.ones_like(slot))

    @torch.no_grad()
    def encode(self, x_BLX, rows=None):
        B, L, V = x_BLX.shape
        dev, n = x_BLX.device, self.draws
        ids_BLS = torch.zeros((B, L, n), dtype=torch.int64, device=dev)
        counts_BLS = torch.zeros((B, L, n), dtype=torch.int64, device=dev)
        entropy_BL = torch.empty((B, L), dtype=torch.float32, device=dev)
        for b0, b1, gen in self._groups(B, rows, dev):
            self._draw(x_BLX[b0:b1].reshape(-1, V), gen, ids_BLS[b0:b1].view(-1, n),
                       counts_BLS[b0:b1].view(-1, n), entropy_BL[b0:b1].view(-1))
        return {"sample_ids": self.ids_to_payload(ids_BLS.reshape(B * L, n), V).reshape(B, L, n),
                "sample_counts": counts_BLS.to(torch.uint8),
                "entropy": entropy_BL.to(torch.float16).unsqueeze(-1)}

    def _log_probs_in_chunks(self, x_PV):
        """(start, rows, log-probabilities at the store's temperature) of logits (P, V), ENCODE_ELEMENTS at a time;
        ValueError on NaN, +inf or an all -inf row."""
        chunk = max(1, self.ENCODE_ELEMENTS // x_PV.shape[1])
        for s in range(0, x_PV.shape[0], chunk):
            z = x_PV[s:s + chunk].float()
            if torch.isnan(z).any() or torch.isposinf(z).any() or torch.isneginf(z).all(-1).any():
                raise ValueError(f"{self.name}: the teacher's logits contain NaN, +inf or an all -inf row; "
                                 "check the teacher's dtype")
            yield s, chunk, (z / self.temperature).log_softmax(-1)

    def _draw(self, x_PV, gen, ids_PS, counts_PS, entropy_P) -> None:
        """Fill ids_PS / counts_PS / entropy_P (views into the outputs) from logits (P, V)."""
        n = self.draws
        for s, chunk, logp in self._log_probs_in_chunks(x_PV):
            p = logp.exp()
            entropy_P[s:s + chunk] = -(p * logp).nan_to_num_(0.0).sum(-1)  # 0 * -inf = 0
            draws_cn = torch.multinomial(p, n, replacement=True, generator=gen)
            self.unique_with_counts(draws_cn, ids_PS[s:s + chunk], counts_PS[s:s + chunk])

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
