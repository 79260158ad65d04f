"""The `factored` codec: final hidden states, the output head stored once (see store/codecs/__init__.py)."""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import TransposeCodec

from distill_pipe.store.codecs.base import FP16_MAX, Codec, Head, PayloadSpec, blosc_shuffle, zstd_crc
from distill_pipe.store.format import StoreError


class FactoredCodec(Codec):
    """Final hidden states + the head stored once.

    hidden_dtype:
      fp16 (default; error ~ fp16 rounding of h), bf16,
      int8 / int4: symmetric, one fp16 scale per `group_size` dims of each position (default: per position);
        rotate=True stores h @ R, R a random orthogonal matrix (spreads h's outlier dims over all dims);
      klt-int8: transform coding. z = h @ A with A whitening the head's Fisher metric
        F = E[W.T (diag p - p p.T) W] (so squared error in z ~ KL error) and decorrelating z (KLT);
        one uniform grid of `step` x std(z) for every coefficient, int8. Low-variance coefficients round
        to 0 and compress away. A is fitted by `calibrate(h, head)` on some teacher positions first.
    The transforms are stored in head/encode_transform (A / grid step) and head/transform (h = stored @ T).
    """

    name = "factored"
    input_kind = "hidden"
    HIDDEN_DTYPES = ("fp16", "bf16", "int8", "int4", "klt-int8")

    def __init__(self, hidden_dtype: str = "fp16", group_size: int | None = None, rotate: bool = False,
                 seed: int = 0, step: float | None = None):
        if hidden_dtype not in self.HIDDEN_DTYPES:
            raise ValueError(f"factored: hidden_dtype {hidden_dtype!r} is not one of {self.HIDDEN_DTYPES}")
        if group_size is not None and (hidden_dtype not in ("int8", "int4") or group_size < 2):
            raise ValueError("factored: group_size applies to hidden_dtype int8/int4 and must be >= 2")
        if rotate and hidden_dtype not in ("int8", "int4"):
            raise ValueError("factored: rotate applies to hidden_dtype int8/int4")
        if (step is not None) != (hidden_dtype == "klt-int8") or (step is not None and step <= 0):
            raise ValueError("factored: hidden_dtype klt-int8 needs step > 0 (e.g. 0.2), other dtypes no step")
        self.hidden_dtype = hidden_dtype
        self.group_size = group_size
        self.rotate = bool(rotate)
        self.seed = int(seed)
        self.step = step
        # (d, d) transforms, set by transforms() (rotate) or calibrate() or loaded from a store: stored = h @ enc,
        # h ~= stored @ dec.
        self.enc_DD: torch.Tensor | None = None
        self.dec_DD: torch.Tensor | None = None

    @property
    def params(self) -> dict:
        p = {"hidden_dtype": self.hidden_dtype}
        if self.group_size is not None:
            p["group_size"] = self.group_size
        if self.rotate:
            p["rotate"] = True
            p["seed"] = self.seed
        if self.step is not None:
            p["step"] = self.step
        return p

    @property
    def uses_transform(self) -> bool:
        return self.rotate or self.hidden_dtype == "klt-int8"

    def transforms(self, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(enc, dec) float32 (d, d), or None for the plain dtypes."""
        if not self.uses_transform:
            return None
        if self.enc_DD is None and self.rotate:
            g = torch.Generator().manual_seed(self.seed)
            q, r = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=g, dtype=torch.float64))
            rot = (q * torch.sign(torch.diagonal(r))).float()
            self.enc_DD, self.dec_DD = rot, rot.T.contiguous()
        if self.enc_DD is None:
            raise ValueError("factored klt-int8: call codec.calibrate(hidden_states, head) before creating the "
                             "store, or encode with the opened store's codec (store.codec) when resuming")
        if self.enc_DD.shape != (hidden_size, hidden_size):
            raise StoreError(f"factored: transform is {tuple(self.enc_DD.shape)}, hidden size is {hidden_size}")
        return self.enc_DD, self.dec_DD

    @torch.no_grad()
    def calibrate(self, h_PD: torch.Tensor, head: dict | Head, chunk: int = 256) -> None:
        """klt-int8: fit the transform on teacher hidden states (P, d) (a few hundred positions suffice)."""
        if self.hidden_dtype != "klt-int8":
            return
        hd = head if isinstance(head, Head) else Head(head["weight"], head.get("bias"),
                                                      head.get("final_logit_softcapping"), head.get("logit_scale"))
        h = h_PD.reshape(-1, h_PD.shape[-1]).double().cpu()
        w = hd.weight_VD.double().cpu()
        d = h.shape[1]
        mass_V = torch.zeros(w.shape[0], dtype=torch.float64)
        mean_outer = torch.zeros(d, d, dtype=torch.float64)
        for s in range(0, h.shape[0], chunk):
            p = torch.softmax(Head(w, None if hd.bias_V is None else hd.bias_V.double().cpu(),
                                   hd.final_logit_softcapping, hd.logit_scale).logits(h[s:s + chunk]), -1)
            mass_V += p.sum(0)
            m = p @ w
            mean_outer += m.T @ m
        # Fisher of the softmax w.r.t. h (soft-capping's slope ignored): E[W.T diag(p) W - (W.T p)(W.T p).T]
        fisher = ((w * mass_V[:, None]).T @ w - mean_outer) / h.shape[0]
        evals, U = torch.linalg.eigh(fisher)
        evals = evals.clamp_min(evals.max() * 1e-10)
        sqrt_f, inv_sqrt_f = U @ torch.diag(evals.sqrt()) @ U.T, U @ torch.diag(evals.rsqrt()) @ U.T
        _, klt = torch.linalg.eigh(torch.cov((h @ sqrt_f).T))  # decorrelate the whitened states
        enc, dec = sqrt_f @ klt, klt.T @ inv_sqrt_f
        delta = self.step * float((h @ enc).std())
        self.enc_DD, self.dec_DD = (enc / delta).float(), (dec * delta).float()

    def _groups(self, d: int) -> int:
        g = self.group_size or d
        if d % g:
            raise ValueError(f"factored: group_size {g} does not divide hidden size {d}")
        return d // g

    def payload_specs(self, vocab_size, hidden_size):
        if hidden_size is None:
            raise ValueError("factored: the store needs hidden_size")
        d = hidden_size
        if self.hidden_dtype == "fp16":
            return {"hidden": PayloadSpec((d,), np.dtype(np.float16), (), blosc_shuffle())}
        if self.hidden_dtype == "bf16":
            return {"hidden": PayloadSpec((d,), np.dtype(np.uint16), (), blosc_shuffle())}
        if self.hidden_dtype == "klt-int8":
            # coefficient-major bytes inside a chunk: one coefficient's values across positions are alike
            return {"hidden": PayloadSpec((d,), np.dtype(np.int8), (TransposeCodec(order=(0, 2, 1)),), zstd_crc(9))}
        groups = self._groups(d)
        if self.hidden_dtype == "int4" and d % 2:
            raise ValueError(f"factored: int4 needs an even hidden size, got {d}")
        width = d if self.hidden_dtype == "int8" else d // 2
        dtype = np.int8 if self.hidden_dtype == "int8" else np.uint8
        return {"hidden": PayloadSpec((width,), np.dtype(dtype), (), zstd_crc(9)),
                "hidden_scale": PayloadSpec((groups,), np.dtype(np.float16), (), blosc_shuffle())}

    def encode(self, x_BLX, rows=None):
        h = x_BLX
        if not torch.isfinite(h).all():
            raise ValueError("factored: the teacher's hidden states contain NaN or inf; "
                             "check the teacher's dtype, or use codec dense-bf16")
        tr = self.transforms(h.shape[-1])
        if tr is not None:
            h = h.float() @ tr[0].to(h.device)
        if self.hidden_dtype in ("fp16", "bf16"):
            amax = h.abs().max().item()
            if self.hidden_dtype == "fp16" and amax > FP16_MAX:
                raise ValueError(f"factored: hidden states reach |h| = {amax:.3g}, beyond fp16 "
                                 f"({FP16_MAX:.0f}); use factored with hidden_dtype=bf16 or dense-bf16")
            if self.hidden_dtype == "fp16":
                return {"hidden": h.to(torch.float16)}
            return {"hidden": h.to(torch.bfloat16).view(torch.uint16)}
        if self.hidden_dtype == "klt-int8":
            return {"hidden": torch.round(h).clamp_(-127, 127).to(torch.int8)}
        B, L, d = h.shape
        groups = self._groups(d)
        qmax = 127 if self.hidden_dtype == "int8" else 7
        hg = h.float().reshape(B, L, groups, d // groups)
        scale = (hg.abs().amax(-1, keepdim=True) / qmax).to(torch.float16).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(hg / scale).clamp(-qmax, qmax).to(torch.int8).reshape(B, L, d)
        if self.hidden_dtype == "int4":
            u = (q & 0xF).to(torch.uint8)
            q = u[..., 0::2] | (u[..., 1::2] << 4)
        return {"hidden": q, "hidden_scale": scale.reshape(B, L, groups).to(torch.float16)}

    def dequantize(self, payload) -> torch.Tensor:
        """Stored hidden rows (P, ...) -> (P, d) float32 in the stored basis (before the transform)."""
        q = payload["hidden"]
        if self.hidden_dtype in ("fp16", "klt-int8"):
            return q.float()
        if self.hidden_dtype == "bf16":
            return q.view(torch.bfloat16).float()
        if self.hidden_dtype == "int4":
            lo = (q & 0xF).to(torch.int8)
            hi = (q >> 4).to(torch.int8)
            q = torch.stack([lo, hi], -1).reshape(*q.shape[:-1], -1)
            q = torch.where(q > 7, q - 16, q)
        scale = payload["hidden_scale"].float()
        P, d = q.shape
        return (q.float().reshape(P, scale.shape[-1], -1) * scale[..., None]).reshape(P, d)

    def decode(self, payload, head):
        if head is None:
            raise StoreError("factored: decoding needs the head (the store's head group is missing)")
        return head.logits(self.dequantize(payload))

    def check_payload(self, payload):
        for name, a in payload.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                return f"{name} holds NaN/inf"
        return None
