"""What the sparse codecs (`sampled`, `topk`, `headtail`) share: id dtype, the temperature they represent, the refusal."""

from __future__ import annotations

import math

import numpy as np
import torch

from distill_pipe.store.codecs.base import Codec


class SparseCodec(Codec):
    """A codec whose targets are a few token ids per position, read by the sparse loss (never as (P, V)).

    temperature: the temperature Ts the stored target represents. `decode` returns logits l with
    softmax(l / Ts) = that target, so dense consumers see it only at T = Ts.
    """

    input_kind = "logits"
    sparse = True
    drops_tokens = True  # a few ids per position: evaluate reports the teacher's perplexity as not comparable
    divergences = ("forward_kl",)
    divergence_limit = ("its targets are an unbiased estimate of the teacher without a rest bucket, and only forward "
                        "KL, linear in the target, stays unbiased from one")

    def __init__(self, temperature: float):
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"{self.name}: temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.vocab_size: int | None = None  # set by payload_specs (the store calls it when opened or created)

    def decode_vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError(f"{self.name}: decode needs the vocabulary size; call payload_specs(V, d) first "
                             "(an opened store's codec has it)")
        return self.vocab_size

    @staticmethod
    def ids_dtype(vocab_size: int) -> np.dtype:
        return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)

    @staticmethod
    def ids_to_payload(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """int64 ids -> the payload dtype, through int16 (wraps to the same low 16 bits): CUDA kernels for
        uint16 are few, a view is metadata only."""
        return ids.to(torch.int16).view(torch.uint16) if vocab_size <= 2**16 else ids.to(torch.int32)

    @staticmethod
    def ids_from_payload(ids: torch.Tensor) -> torch.Tensor:
        return ids.view(torch.int16).long() & 0xFFFF if ids.dtype == torch.uint16 else ids.long()

    def temperatures(self) -> tuple[float, ...]:
        """Training temperatures whose targets this store represents exactly."""
        return (self.temperature,)

    def check_temperature(self, temperature: float) -> str | None:
        ok = self.temperatures()
        if any(abs(temperature - t) <= 1e-6 * t for t in ok):
            return None
        shown = " or ".join(f"{t:g}" for t in ok)
        return (f"the store's {self.name} codec represents the teacher at temperature {shown} only, not "
                f"train.temperature={temperature:g}: set train.temperature {shown}, or rerun `distill-pipe "
                f"teacher-logits` with teacher_logits.codec_params.temperature={temperature:g}")

    def require_temperature(self, temperature: float) -> None:
        problem = self.check_temperature(temperature)
        if problem:
            raise ValueError(problem)
