"""The `dense-bf16` codec: raw logits as bf16 bits, lossless against bf16 (see store/codecs/__init__.py)."""

from __future__ import annotations

import numpy as np
import torch

from distill_pipe.store.codecs.base import Codec, PayloadSpec, blosc_shuffle


class DenseBF16Codec(Codec):
    """Raw logits as bf16 bits (uint16): lossless with respect to the bf16 cast."""

    name = "dense-bf16"
    input_kind = "logits"

    @property
    def params(self) -> dict:
        return {}

    def payload_specs(self, vocab_size, hidden_size):
        return {"logits_bf16": PayloadSpec((vocab_size,), np.dtype(np.uint16), (), blosc_shuffle())}

    def encode(self, x_BLX, rows=None):
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
