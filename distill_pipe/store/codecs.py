"""Codecs: how one position's V-way teacher distribution is stored, and how it comes back.

Shapes: B batch, L sequence length, P flattened positions (B*L), V vocabulary, d hidden size.

Every codec reconstructs "teacher logits up to an additive constant per position" in float32, chunk by
chunk over flattened positions. Temperature is never baked in: consumers apply log_softmax(logits / T).

- `factored`   input: final (normalised) hidden states (B, L, d). Payload: `hidden` (B, L, d), fp16 by
               default; the output head (weight (V, d), bias, soft-capping, logit scale) is stored once.
               logits = post(h @ W.T + b). Lower-precision `hidden_dtype`s trade error for size.
- `dense-bf16` input: logits (B, L, V). Payload: `logits_bf16` (B, L, V) uint16 = the bf16 bit pattern.
- `dense-u8`   input: logits (B, L, V). Payload: `logprobs_u8` (B, L, V) uint8. With r = log p - max log p
               (<= 0), code = round((1 - exp(gamma * r)) / step) (gamma > 0; "companded"), or
               code = round(-r / step) (gamma = 0; plain fixed step in nats), clamped to 0..254; tokens of
               the smallest-probability tail whose total mass is below `tail_mass` get 255 = probability 0.
               The tail is found in O(V): a per-position histogram of mass per code, dropping whole codes
               from 254 down while their total stays below tail_mass.
               Decoding: r = log(1 - code * step) / gamma (or -code * step); 255 -> -inf.
               With `exact_top_k` = k > 0 also `top_ids` (B, L, k) (uint16, int32 if V > 65536) and
               `top_logprobs` (B, L, k) fp16 = r of the k most likely tokens (descending), written over the
               decoded row; the 8-bit grid then starts at the k-th of them: codes quantise min(r - r_k, 0)
               and decode to table[code] + r_k (r_k as stored in fp16; 0 if it is -inf).

Encoding runs in torch on the input's device; only the compact payload needs to cross to the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from distill_pipe.store.format import StoreError

CODEC_NAMES = ("factored", "dense-bf16", "dense-u8")
FP16_MAX = 65504.0


@dataclass(frozen=True)
class PayloadSpec:
    """One payload array: shape (N, L, *trailing), numpy dtype, and zarr inner codecs."""

    trailing: tuple[int, ...]
    dtype: np.dtype
    filters: tuple = ()
    compressors: tuple = ()


def _blosc2() -> tuple:
    # Byte shuffle beats bit shuffle on floats (DESIGN.md); crc32c so corruption is detected, not decoded.
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), Crc32cCodec())


def _zstd(level: int = 3) -> tuple:
    return (ZstdCodec(level=level), Crc32cCodec())


@dataclass
class Head:
    """The teacher's output head: logits = post(h @ weight.T + bias); post = logit_scale then soft-capping.

    `transform_DD` (d, d) is set when the stored hidden states live in another basis: h = h_stored @ T.
    It is folded into the weight once (h @ W.T == h_stored @ (W @ T.T).T).
    """

    weight_VD: torch.Tensor
    bias_V: torch.Tensor | None = None
    final_logit_softcapping: float | None = None
    logit_scale: float | None = None
    transform_DD: torch.Tensor | None = None
    _effective_VD: torch.Tensor | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.weight_VD.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight_VD.shape[1]

    def effective_weight(self) -> torch.Tensor:
        if self._effective_VD is None:
            w = self.weight_VD  # float32 from a store; calibrate() runs it in float64
            self._effective_VD = w if self.transform_DD is None else w @ self.transform_DD.to(w.dtype).T
        return self._effective_VD

    def to(self, device) -> Head:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Head(move(self.weight_VD), move(self.bias_V), self.final_logit_softcapping,
                    self.logit_scale, move(self.transform_DD), move(self._effective_VD))

    def logits(self, h_PD: torch.Tensor) -> torch.Tensor:
        """(P, d) stored hidden states -> (P, V) float32 logits."""
        w = self.effective_weight()
        logits_PV = h_PD.to(w.dtype) @ w.T
        if self.bias_V is not None:
            logits_PV += self.bias_V.to(logits_PV.dtype)
        if self.logit_scale is not None:
            logits_PV *= self.logit_scale
        if self.final_logit_softcapping is not None:
            c = self.final_logit_softcapping
            logits_PV = torch.tanh(logits_PV / c) * c
        return logits_PV


def head_from_model(model) -> dict:
    """The head dict `create_store` wants, from a transformers causal LM, or StoreError if not factorable."""
    lm_head = model.get_output_embeddings()
    cfg = model.config
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if not isinstance(lm_head, torch.nn.Linear):
        raise StoreError(f"{type(model).__name__}'s output head is {type(lm_head).__name__}, not a linear "
                         "layer over the last hidden state; use codec dense-u8 or dense-bf16")
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = getattr(text_cfg, "logit_scale", None)
    return {
        "weight": lm_head.weight.detach().float().cpu(),
        "bias": None if lm_head.bias is None else lm_head.bias.detach().float().cpu(),
        "final_logit_softcapping": None if softcap is None else float(softcap),
        "logit_scale": None if scale is None or scale == 1.0 else float(scale),
    }


class Codec:
    name: str
    input_kind: str

    @property
    def params(self) -> dict:
        raise NotImplementedError

    def payload_specs(self, vocab_size: int, hidden_size: int | None) -> dict[str, PayloadSpec]:
        raise NotImplementedError

    def encode(self, x_BLX: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, payload: dict[str, torch.Tensor], head: Head | None) -> torch.Tensor:
        """Payload rows (P, ...) on any device -> (P, V) float32 logits on that device."""
        raise NotImplementedError

    def check_payload(self, payload: dict[str, np.ndarray]) -> str | None:
        """Cheap sanity check of decompressed payload rows; returns a problem or None (used by verify)."""
        return None

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


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
            return {"hidden": PayloadSpec((d,), np.dtype(np.float16), (), _blosc2())}
        if self.hidden_dtype == "bf16":
            return {"hidden": PayloadSpec((d,), np.dtype(np.uint16), (), _blosc2())}
        if self.hidden_dtype == "klt-int8":
            # coefficient-major bytes inside a chunk: one coefficient's values across positions are alike
            return {"hidden": PayloadSpec((d,), np.dtype(np.int8), (TransposeCodec(order=(0, 2, 1)),), _zstd(9))}
        groups = self._groups(d)
        if self.hidden_dtype == "int4" and d % 2:
            raise ValueError(f"factored: int4 needs an even hidden size, got {d}")
        width = d if self.hidden_dtype == "int8" else d // 2
        dtype = np.int8 if self.hidden_dtype == "int8" else np.uint8
        return {"hidden": PayloadSpec((width,), np.dtype(dtype), (), _zstd(9)),
                "hidden_scale": PayloadSpec((groups,), np.dtype(np.float16), (), _blosc2())}

    def encode(self, x_BLX):
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


class DenseBF16Codec(Codec):
    """Raw logits as bf16 bits (uint16): lossless with respect to the bf16 cast."""

    name = "dense-bf16"
    input_kind = "logits"

    @property
    def params(self) -> dict:
        return {}

    def payload_specs(self, vocab_size, hidden_size):
        return {"logits_bf16": PayloadSpec((vocab_size,), np.dtype(np.uint16), (), _blosc2())}

    def encode(self, x_BLX):
        if torch.isnan(x_BLX).any():
            raise ValueError("dense-bf16: the teacher's logits contain NaN; check the teacher's dtype")
        return {"logits_bf16": x_BLX.to(torch.bfloat16).view(torch.uint16)}

    def decode(self, payload, head):
        return payload["logits_bf16"].view(torch.bfloat16).float()

    def check_payload(self, payload):
        a = payload["logits_bf16"]
        # bf16 NaN: exponent all ones and a non-zero mantissa.
        if (((a & 0x7F80) == 0x7F80) & ((a & 0x007F) != 0)).any():
            return "logits_bf16 holds NaN"
        return None


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
        c = torch.arange(255, dtype=torch.float64)
        r = torch.log1p(-c * self.step) / self.gamma if self.gamma > 0 else -c * self.step
        self._table = torch.cat([r, torch.tensor([-math.inf], dtype=torch.float64)]).float()  # (256,)

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
        # Vocab-major bytes inside each chunk (transpose): a token that is in the tail at every position
        # becomes one run of 255s, which zstd stores almost for free.
        specs = {"logprobs_u8": PayloadSpec((vocab_size,), np.dtype(np.uint8),
                                            (TransposeCodec(order=(0, 2, 1)),), _zstd(self.zstd_level))}
        if self.exact_top_k:
            self._check_k(vocab_size)
            k = (self.exact_top_k,)
            specs["top_ids"] = PayloadSpec(k, self.ids_dtype(vocab_size), (), _zstd(self.zstd_level))
            specs["top_logprobs"] = PayloadSpec(k, np.dtype(np.float16), (), _blosc2())
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
    def encode(self, x_BLX):
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


def make_codec(name: str, **params) -> Codec:
    """'factored' | 'dense-bf16' | 'dense-u8', with that codec's parameters (see the classes)."""
    classes = {"factored": FactoredCodec, "dense-bf16": DenseBF16Codec, "dense-u8": DenseU8Codec}
    if name not in classes:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    try:
        return classes[name](**params)
    except TypeError as e:
        raise ValueError(f"codec {name}: bad parameters {params}: {e}") from None
