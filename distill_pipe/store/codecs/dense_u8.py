"""The `dense-u8` codec: companded 8-bit log-probs with an exact top-k overlay (see store/codecs/__init__.py)."""

from __future__ import annotations

import math

import numpy as np
import torch

from distill_pipe.config import DIVERGENCES
from distill_pipe.store.codecs.base import Codec, PayloadSpec, blosc_shuffle, zstd_crc


class DenseU8Codec(Codec):
    """Per-position log-probs relative to the max, 8-bit, the low-mass tail dropped, the top-k exact.

    step, gamma: the 8-bit grid (module doc); gamma None = 0.4 with an overlay, 0.2 without (a grid that
    starts at the k-th token can be coarser far down; one that starts at the max must reach further).
    tail_mass: the dropped tail's mass per position stays below it.
    exact_top_k: per position, the k most likely tokens also go in `top_ids` / `top_logprobs` (fp16 r), and
    decoding writes them over the 8-bit row: much of the mass sits there, and so much of the rounding error.
    """

    name = "dense-u8"
    input_kind = "logits"
    SENTINEL = 255
    ENCODE_ELEMENTS = 2**22  # (chunk, V) elements per encode step: bounds the temporaries (~16 MB each in fp32)

    # Defaults measured on SmolLM2-135M over 2,048 pydoc positions (benchmarks/codecs.py): 8,783 B/token
    # (11.2x smaller than raw bf16) at mean TV 1.4e-3 at T=1 (gamma 0.2: 9,224 B, 1.4e-3; exact_top_k=0:
    # 8,397 B, 3.5e-3). At T=2 and 4 the dropped tail costs TV 0.24 and 0.63, whatever the grid.
    # The size follows the tokens kept (those outside the tail, ~1.3-1.4 B each), i.e. the teacher's support on
    # the text: 9.3-13.3 KB/token on four texts at the same TV (docs/benchmarks.md, "What dense-u8's size depends on").
    def __init__(self, step: float = 1 / 255, tail_mass: float = 1e-3, gamma: float | None = None,
                 zstd_level: int = 9, exact_top_k: int = 32):
        if gamma is None:
            gamma = 0.4 if exact_top_k else 0.2
        if not 0 <= tail_mass < 0.5:
            raise ValueError(f"dense-u8: tail_mass must be in [0, 0.5), got {tail_mass}")
        if step <= 0 or gamma < 0:
            raise ValueError(f"dense-u8: need step > 0 and gamma >= 0, got step={step}, gamma={gamma}")
        if gamma > 0 and step * 254 >= 1:
            raise ValueError(f"dense-u8: with gamma > 0 step must be < 1/254 so codes stay in range, got {step}")
        if int(exact_top_k) != exact_top_k or exact_top_k < 0:
            raise ValueError(f"dense-u8: exact_top_k must be an integer >= 0 (0 = no overlay), got {exact_top_k}")
        self.step = float(step)
        self.tail_mass = float(tail_mass)
        self.gamma = float(gamma)
        self.zstd_level = int(zstd_level)
        self.exact_top_k = int(exact_top_k)
        if self.tail_mass > 0:  # the dropped tail decodes to probability 0, where KL(q || p) is infinite
            self.divergences = tuple(d for d in DIVERGENCES if d != "reverse_kl")
            self.divergence_limit = (f"it dropped its tail (probability 0 for the least likely tokens, < "
                                     f"{self.tail_mass:g} of the teacher's mass), where reverse KL is infinite (a "
                                     "dense-u8 store made with teacher_logits.codec_params.tail_mass 0 allows it)")
        c = torch.arange(255, dtype=torch.float64)
        r = torch.log1p(-c * self.step) / self.gamma if self.gamma > 0 else -c * self.step
        self._table = torch.cat([r, torch.tensor([-math.inf], dtype=torch.float64)]).float()  # (256,)

    @property
    def drops_tokens(self) -> bool:
        return self.tail_mass > 0

    def check_temperature(self, temperature):
        # At T <= 1 the dropped tail's share of the mass can only shrink: the tail holds the least likely
        # tokens, and p_i^(1/T) falls fastest for them (d/dbeta log sum_S p^beta is a p^beta-weighted mean of
        # log p, lower on the tail than off it). Above T=1 it grows without a bound the store can give:
        # benchmarks/codecs.py measured TV 0.013 to the teacher at T=1.25 and 0.24 at T=2 (docs/benchmarks.md, Codecs).
        if temperature <= 1:
            return None
        what = (f"dropped its tail (the least likely tokens, < {self.tail_mass:g} of the mass at T=1, a share "
                "that grows with T: TV 0.24 to the teacher at T=2)" if self.tail_mass > 0 else
                "raised the far tail to its 8-bit grid's last code, which inflates the tail above T=1")
        return (f"train.temperature {temperature:g} needs a store that keeps the full distribution: the dense-u8 "
                f"store {what}; use temperature <= 1, or teacher_logits.codec factored or dense-bf16")

    @property
    def params(self) -> dict:
        return {"step": self.step, "tail_mass": self.tail_mass, "gamma": self.gamma,
                "zstd_level": self.zstd_level, "exact_top_k": self.exact_top_k}

    @staticmethod
    def ids_dtype(vocab_size: int) -> np.dtype:
        return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)

    def _check_k(self, vocab_size: int) -> None:
        if self.exact_top_k > vocab_size:
            raise ValueError(f"dense-u8: exact_top_k={self.exact_top_k} exceeds the vocabulary size {vocab_size}; "
                             "lower exact_top_k")

    def payload_specs(self, vocab_size, hidden_size):
        # Position-major rows, as the loss reads them. Earlier stores transposed each chunk vocab-major: on
        # SmolLM2's rows 6% smaller (8,685 vs 9,242 B/token over 2,048 pydoc positions) but undoing the
        # transpose cost every read ~30% more CPU than zstd alone (benchmarks/read_path.py). Those stores still
        # read: each array's zarr metadata records its codecs.
        specs = {"logprobs_u8": PayloadSpec((vocab_size,), np.dtype(np.uint8), (), zstd_crc(self.zstd_level),
                                            masked_fill=self.SENTINEL)}
        if self.exact_top_k:
            self._check_k(vocab_size)
            k = (self.exact_top_k,)
            specs["top_ids"] = PayloadSpec(k, self.ids_dtype(vocab_size), (), zstd_crc(self.zstd_level))
            specs["top_logprobs"] = PayloadSpec(k, np.dtype(np.float16), (), blosc_shuffle())
        return specs

    def quantize(self, r_PV: torch.Tensor) -> torch.Tensor:
        """Relative log-probs (<= 0) -> codes 0..254 (float; a new tensor)."""
        if self.gamma > 0:
            q = torch.mul(r_PV, self.gamma).exp_().neg_().add_(1).div_(self.step)  # (1 - exp(gamma r)) / step
        else:
            q = torch.div(r_PV, -self.step)
        return q.round_().clamp_(0, 254)

    def tail_codes(self, code_PV: torch.Tensor, e_PV: torch.Tensor, z_P1: torch.Tensor) -> torch.Tensor:
        """(P, 1) first dropped code per position: codes >= it hold total mass < tail_mass (255: none dropped).

        code_PV: int64 codes 0..254; e_PV = exp(r), z_P1 = its row sums (probability = e / z).
        O(V): the mass of each code (a 255-bin histogram), summed from the least likely code up. Whole codes
        go, so this drops at most what a sort would (a sort may also split the boundary code).
        """
        hist_PC = torch.zeros(code_PV.shape[0], 255, dtype=e_PV.dtype, device=e_PV.device)
        hist_PC.scatter_add_(1, code_PV, e_PV)
        at_or_below_PC = hist_PC.flip(-1).cumsum_(-1).flip(-1)  # [c] = mass of codes >= c; non-increasing in c
        # kept codes are 0 .. first-1; code 0 holds the max, so at_or_below[0] = z > tail_mass * z
        return (at_or_below_PC >= self.tail_mass * z_P1).sum(-1, keepdim=True)

    @torch.no_grad()
    def encode(self, x_BLX, rows=None):
        B, L, V = x_BLX.shape
        self._check_k(V)
        x_PV = x_BLX.reshape(B * L, V)
        dev, k, chunk = x_BLX.device, self.exact_top_k, max(1, self.ENCODE_ELEMENTS // V)
        out_PV = torch.empty((B * L, V), dtype=torch.uint8, device=dev)
        if k:
            ids_PK = torch.empty((B * L, k), dtype=getattr(torch, self.ids_dtype(V).name), device=dev)
            top_PK = torch.empty((B * L, k), dtype=torch.float16, device=dev)
        for s in range(0, B * L, chunk):
            x = x_PV[s:s + chunk].float()  # (c, V)
            m_P1 = x.amax(-1, keepdim=True)
            if not torch.isfinite(m_P1).all():  # NaN and +inf both reach the max; -inf rows have no max
                raise ValueError("dense-u8: the teacher's logits contain NaN, +inf or an all -inf row; "
                                 "check the teacher's dtype")
            r = x - m_P1  # relative log-probs, <= 0
            e = r.exp()
            if k:
                top = torch.topk(r, k, -1)
                ids_PK[s:s + chunk] = top.indices
                top_PK[s:s + chunk] = top16 = top.values.half()
                r.sub_(self._grid_origin(top16)).clamp_(max=0)  # the overlay's tokens -> code 0
            code = self.quantize(r).long()
            drop = code >= self.tail_codes(code, e, e.sum(-1, keepdim=True))
            drop |= torch.isneginf(r)  # masked vocab entries (probability exactly 0)
            out_PV[s:s + chunk] = code.masked_fill_(drop, self.SENTINEL)
        out = {"logprobs_u8": out_PV.reshape(B, L, V)}
        if k:
            out.update(top_ids=ids_PK.reshape(B, L, k), top_logprobs=top_PK.reshape(B, L, k))
        return out

    @staticmethod
    def _grid_origin(top_PK: torch.Tensor) -> torch.Tensor:
        """(P, 1) float32: r of the k-th most likely token (fp16, as stored), 0 where it is -inf (masked vocab).

        With an overlay the 8-bit grid starts there, not at the max: its finest steps then fall on the tokens
        just below the top k, where the mass the overlay does not cover sits.
        """
        origin = top_PK[:, -1:].float()
        return torch.where(torch.isfinite(origin), origin, 0.0)

    def decode(self, payload, head):
        q = payload["logprobs_u8"]
        out_PV = self._table.to(q.device)[q.long()]
        if self.exact_top_k:
            top_PK = payload["top_logprobs"]
            out_PV += self._grid_origin(top_PK)
            out_PV.scatter_(1, payload["top_ids"].long(), top_PK.float())
        return out_PV

    def check_payload(self, payload):
        a = payload["logprobs_u8"]
        if a.size and not (a.reshape(-1, a.shape[-1]) == 0).any(-1).all():
            return "logprobs_u8 has a position without its max (code 0)"
        if self.exact_top_k and a.size:
            ids = payload["top_ids"].reshape(-1, self.exact_top_k)
            lp = payload["top_logprobs"].reshape(-1, self.exact_top_k).astype(np.float32)
            if ids.min() < 0 or ids.max() >= a.shape[-1]:
                return f"top_ids holds ids outside the vocabulary [0, {a.shape[-1]})"
            if np.isnan(lp).any() or (lp[:, 0] != 0).any() or (lp[:, 1:] > lp[:, :-1]).any():
                return "top_logprobs is not a descending row starting at 0 (the max) at every position"
        return None

