"""What every codec shares: the payload spec, zarr compressor presets, the teacher head, the Codec base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from distill_pipe.config import DIVERGENCES
from distill_pipe.divergences import resolve_divergence
from distill_pipe.store.format import StoreError

FP16_MAX = 65504.0


@dataclass(frozen=True)
class PayloadSpec:
    """One payload array: shape (N, L, *trailing), numpy dtype, and zarr inner codecs."""

    trailing: tuple[int, ...]
    dtype: np.dtype
    filters: tuple = ()
    compressors: tuple = ()
    masked_fill: int | float = 0
    """Written at the positions a store with a target mask does not keep (store/format.py v2): whatever
    compresses best in this array's layout; never decoded."""


def blosc_shuffle() -> tuple:
    # Byte shuffle beats bit shuffle on floats (benchmarks/codecs.py); crc32c so corruption is detected, not decoded.
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2), Crc32cCodec())


def zstd_crc(level: int = 3) -> tuple:
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
        """(P, d) stored hidden states -> (P, V) float32 logits, also inside an autocast region."""
        w = self.effective_weight()
        # The trainer's bf16 autocast (train.dtype bfloat16 on one device) would run h @ W.T in bf16:
        # TV ~1e-2 to the teacher instead of ~3e-4. The teacher's targets are decoded in float32 always.
        with torch.autocast(h_PD.device.type, enabled=False):
            logits_PV = h_PD.to(w.dtype) @ w.T
        if self.bias_V is not None:
            logits_PV += self.bias_V.to(logits_PV.dtype)
        if self.logit_scale is not None:
            logits_PV *= self.logit_scale
        if self.final_logit_softcapping is not None:
            c = self.final_logit_softcapping
            logits_PV = torch.tanh(logits_PV / c) * c
        return logits_PV


def head_from_model(model, tensors: dict | None = None, float32: bool = True) -> dict:
    """The head dict `create_store` wants, from a transformers causal LM, or StoreError if not factorable.
    tensors: {"weight", "bias"} to use instead of the module's own (e.g. gathered from FSDP shards).
    float32=False keeps the model's dtype (create_store converts block by block: no whole fp32 copy)."""
    lm_head = model.get_output_embeddings()
    cfg = model.config
    text_cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    if not isinstance(lm_head, torch.nn.Linear):
        raise StoreError(f"{type(model).__name__}'s output head is {type(lm_head).__name__}, not a linear "
                         "layer over the last hidden state; use codec dense-u8 or dense-bf16")
    softcap = getattr(text_cfg, "final_logit_softcapping", None)
    scale = getattr(text_cfg, "logit_scale", None)
    tensors = tensors or {"weight": lm_head.weight.detach(), "bias": None if lm_head.bias is None else lm_head.bias.detach()}
    return {
        "weight": (tensors["weight"].float() if float32 else tensors["weight"]).cpu(),
        "bias": None if tensors.get("bias") is None else tensors["bias"].float().cpu(),
        "final_logit_softcapping": None if softcap is None else float(softcap),
        "logit_scale": None if scale is None or scale == 1.0 else float(scale),
    }


class Codec:
    name: str
    input_kind: str
    sparse = False
    """True for codecs read through `sparse_targets` (a few ids per position) rather than `decode`."""
    drops_tokens: bool = False
    """True when the stored distribution gives some tokens probability zero that the teacher did not (a
    dropped tail, top-k, samples): the teacher's own perplexity read from such a store is not comparable."""

    divergences: tuple[str, ...] = DIVERGENCES
    """The train.divergence values the loss computes from this codec's targets (exactly, or unbiasedly from an
    unbiased estimate); training refuses the others before any compute (trainer.check_store_divergence). A new
    codec declares its own: a sparse codec without a rest bucket allows forward_kl only (SparseCodec)."""
    divergence_limit: str = ""
    """Why the other divergences are not computed from this codec's store (a clause of the refusal)."""

    def check_divergence(self, divergence: str, beta: float) -> str | None:
        """Why training with `divergence` (and `beta`) from this codec's store would be wrong (one line naming the
        divergences and codecs that allow it), or None."""
        computed = resolve_divergence(divergence, beta)
        if computed in self.divergences:
            return None
        from distill_pipe.store.codecs import CODECS  # the registry imports this module

        asked = f"train.divergence {divergence}" + (f" with train.beta {beta:g} (= {computed})"
                                                     if divergence != computed else "")
        ok = ["jsd (beta < 1)" if d == "jsd" and "reverse_kl" not in self.divergences else d for d in self.divergences]
        stores = [name for name, codec in CODECS.items() if computed in codec.divergences and name != self.name]
        return (f"{asked} cannot be computed from the {self.name} store: {self.divergence_limit}; use "
                f"train.divergence {_either(ok)}, or a store of codec {_either(stores)}")

    def check_temperature(self, temperature: float) -> str | None:
        """Why training at `temperature` from this codec's store would be wrong (a one-line fix), or None.
        Training refuses such a temperature before any compute (trainer.check_store_temperature)."""
        return None

    def sparse_targets(self, payload: dict[str, torch.Tensor], temperature: float):
        """Sparse codecs: payload rows (P, ...) -> losses.SparseTargets at `temperature`."""
        raise NotImplementedError(f"{self.name} is not a sparse codec")

    @property
    def params(self) -> dict:
        raise NotImplementedError

    def payload_specs(self, vocab_size: int, hidden_size: int | None) -> dict[str, PayloadSpec]:
        raise NotImplementedError

    def encode(self, x_BLX: torch.Tensor, rows: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """(B, L, X) teacher output -> payload tensors (B, L, ...). `rows`: a stable name for each of the B
        sequences (the teacher stage passes "split/index"); a codec that draws at random seeds each sequence's
        draws from it, so a resumed, re-batched or multi-rank store is the same store."""
        raise NotImplementedError

    def decode(self, payload: dict[str, torch.Tensor], head: Head | None) -> torch.Tensor:
        """Payload rows (P, ...) on any device -> (P, V) float32 logits on that device."""
        raise NotImplementedError

    def check_payload(self, payload: dict[str, np.ndarray]) -> str | None:
        """Cheap sanity check of decompressed payload rows; returns a problem or None (used by verify)."""
        return None

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def _either(names: list[str]) -> str:
    """"a", "a or b", "a, b or c"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
