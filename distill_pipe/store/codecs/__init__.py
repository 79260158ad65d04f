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

- `sampled`    input: logits. Payload: `sample_ids` (B, L, n), `sample_counts` (B, L, n) uint8, `entropy` (B, L, 1)
               fp16: n draws from softmax(z / Ts) as unique ids with counts (store/codecs/sampled.py).
- `topk`       input: logits. Payload: `top_ids` (B, L, k), `top_logits` (B, L, k) fp16 = z - max z (T=1),
               `tail_logmass` (B, L, 2) fp16 = log mass outside the top k at T=1 and Ts (store/codecs/topk.py).
- `headtail`   input: logits. Payload: `head_ids` (B, L, m), `head_logprobs` (B, L, m) fp16 = log p_Ts of the m most
               likely ids, `tail_ids` (B, L, n), `tail_counts` (B, L, n) uint8 = n draws from the rest renormalised,
               `stats` (B, L, 2) fp16 = log of the mass outside the head and the entropy, at Ts
               (store/codecs/headtail.py).
  The sparse codecs are read through `sparse_targets(payload, T)` by the sparse loss; their `decode` returns
  logits whose softmax at their temperature Ts is the stored target (for inspection and evaluation).
  Their ids are uint16, int32 for V > 65536.

Encoding runs in torch on the input's device; only the compact payload needs to cross to the CPU.
One module per codec; this package's `CODECS` is the registry.
"""

from __future__ import annotations

from distill_pipe.store.codecs.base import FP16_MAX, Codec, Head, PayloadSpec, head_from_model
from distill_pipe.store.codecs.dense_bf16 import DenseBF16Codec
from distill_pipe.store.codecs.dense_u8 import DenseU8Codec
from distill_pipe.store.codecs.factored import FactoredCodec
from distill_pipe.store.codecs.headtail import HeadTailCodec
from distill_pipe.store.codecs.sampled import SampledCodec
from distill_pipe.store.codecs.topk import TopKCodec

# The registry: one module per codec in this package.
CODECS: dict[str, type[Codec]] = {"factored": FactoredCodec, "dense-bf16": DenseBF16Codec, "dense-u8": DenseU8Codec,
                                  "sampled": SampledCodec, "topk": TopKCodec,
                                  "headtail": HeadTailCodec}
CODEC_NAMES = tuple(CODECS)

__all__ = ["CODECS", "CODEC_NAMES", "FP16_MAX", "Codec", "DenseBF16Codec", "DenseU8Codec", "FactoredCodec", "Head", "HeadTailCodec",
           "PayloadSpec", "SampledCodec", "TopKCodec", "head_from_model", "make_codec"]


def make_codec(name: str, **params) -> Codec:
    """'factored' | 'dense-bf16' | 'dense-u8' | 'sampled' | 'topk' | 'headtail', with that codec's parameters (see the CODECS)."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}")
    try:
        return CODECS[name](**params)
    except (TypeError, ValueError) as e:  # an unknown key, or a value of the wrong kind (int("many"))
        raise ValueError(f"codec {name}: bad parameters {params} (teacher_logits.codec_params): {e}") from None
