"""The student's output head as the fused loss sees it, and the student's forward up to it.

Shapes: B batch, L sequence length, N = B*L, d hidden size, P the head's rows (a padded vocabulary: P >= V),
V the compared vocabulary, C rows of one chunk.

A causal LM's logits are taken to be a linear head over its last hidden state h (after the final norm) with, at
most, a scale and a final soft-cap:

    z = softcap(scale * (h W[:V]^T + b[:V])),   softcap(u) = cap * tanh(u / cap)

scale is Cohere's `logit_scale` (a multiplier) or 1 / Granite's `logits_scaling` (a divisor); cap is Gemma 2/3's
`final_logit_softcapping`. Rows of W beyond the compared vocabulary (a padded head) are never formed. The loss
(losses.py) forms z a chunk of rows at a time from h and W, so the student's (N, V) logits never exist.

`run_head` runs the model's own forward with its output head module replaced, for that one call, by a function of
(h, W, b): every wrapper's hooks fire as in a normal forward (FSDP2 gathers the root unit, which holds the head,
once per micro-batch, and reduce-scatters its gradient with the others), and the head's (N, V) product is never
computed. `check_linear_head` refuses, at train start, a student whose logits are something else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from distill_pipe.config import ConfigError

CHECK_POSITIONS = 8
"""Positions of the first training sequence on which check_linear_head compares the two ways of forming logits."""


@dataclass(frozen=True)
class HeadSpec:
    """What the student does to h W^T + b, and which rows count."""

    vocab_size: int
    """The compared rows V (the head may hold more: a padded vocabulary)."""
    scale: float = 1.0
    softcap: float | None = None

    def prepare(self, weight_Pd: torch.Tensor, bias_P: torch.Tensor | None):
        """(W[:V] fp32 (V, d), b[:V] fp32 or None): once per micro-batch (a copy only when the head is not fp32,
        e.g. bf16 parameters under FSDP mixed precision)."""
        b_V = None if bias_P is None else bias_P[: self.vocab_size].float()
        return weight_Pd[: self.vocab_size].float(), b_V

    def logits(self, h_Cd: torch.Tensor, W_Vd: torch.Tensor, b_V: torch.Tensor | None) -> torch.Tensor:
        """fp32 (C, V) logits of C rows of hidden states, the matmul in fp32 also under autocast."""
        with torch.autocast(h_Cd.device.type, enabled=False):
            h_Cd = h_Cd.float()
            z_CV = h_Cd @ W_Vd.T if b_V is None else torch.addmm(b_V, h_Cd, W_Vd.T)
            if self.scale != 1.0:
                z_CV.mul_(self.scale)
            if self.softcap is not None:
                z_CV.div_(self.softcap).tanh_().mul_(self.softcap)
        return z_CV

    def backprop_(self, z_CV: torch.Tensor, g_CV: torch.Tensor) -> torch.Tensor:
        """g_CV = dloss/dz -> dloss/d(h W^T + b), in place; consumes z_CV (the logits `logits` returned)."""
        if self.softcap is not None:  # d(cap tanh(u / cap))/du = 1 - tanh^2 = 1 - (z / cap)^2
            g_CV.mul_(z_CV.div_(self.softcap).square_().neg_().add_(1.0))
        if self.scale != 1.0:
            g_CV.mul_(self.scale)
        return g_CV


def output_head(model: nn.Module) -> nn.Module:
    """The model's output head module (HF get_output_embeddings), ConfigError when it has none with a weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError(f"the student {type(model).__name__} has no linear output head (get_output_embeddings()); "
                          "the loss forms the logits from the last hidden state and that head: use a causal LM "
                          "with an lm_head")
    return head


def head_spec(model: nn.Module, vocab_size: int | None = None) -> HeadSpec:
    """The HeadSpec of a Hugging Face causal LM: rows `vocab_size` (None: all of the head's), its config's
    final_logit_softcapping (Gemma 2/3), logits_scaling (Granite) and the model's logit_scale (Cohere)."""
    rows = output_head(model).weight.shape[0]
    config = getattr(model, "config", None)
    scale = 1.0
    logit_scale = getattr(model, "logit_scale", None)  # Cohere: an attribute of the model, from config.logit_scale
    if isinstance(logit_scale, (int, float)):
        scale *= float(logit_scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor:
        scale /= float(divisor)
    cap = getattr(config, "final_logit_softcapping", None)
    return HeadSpec(vocab_size=min(vocab_size or rows, rows), scale=scale, softcap=float(cap) if cap else None)


def run_head(model: nn.Module, input_ids_BL: torch.Tensor, fn: Callable) -> object:
    """fn(hidden_BLd, weight_Pd, bias_P or None) evaluated inside model's forward in place of its output head;
    returns what fn returned. The head's weight is what the forward would use (under FSDP2 the gathered one)."""
    head = output_head(model)
    out = []

    def forward(hidden_BLd: torch.Tensor) -> torch.Tensor:
        out.append(fn(hidden_BLd, head.weight, head.bias))
        return hidden_BLd.new_zeros(*hidden_BLd.shape[:-1], 1)  # stands in for the logits, which nobody reads

    head.forward = forward
    try:
        model(input_ids=input_ids_BL, use_cache=False)
    finally:
        del head.forward
    if len(out) != 1:
        raise ConfigError(f"the forward of the student {type(model).__name__} called its output head {len(out)} "
                          "times, not once on its last hidden state; the loss cannot form its logits from them")
    return out[0]


def check_linear_head(model: nn.Module, input_ids_BL: torch.Tensor, vocab_size: int | None = None) -> None:
    """ConfigError unless the model's logits on input_ids_BL equal the HeadSpec's over its last hidden state.

    Runs two forwards in eval mode without gradients (no dropout, no random numbers drawn); on a few positions."""
    spec = head_spec(model, vocab_size)
    input_ids_BL = input_ids_BL[:, :CHECK_POSITIONS]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref_BLV = model(input_ids=input_ids_BL, use_cache=False).logits
            got_NV, exact = run_head(model, input_ids_BL, lambda h, w, b: (
                spec.logits(h.flatten(0, 1), *spec.prepare(w, b)), w.dtype == torch.float32))
    finally:
        model.train(was_training)
    ref_NV = ref_BLV.flatten(0, 1)[:, : spec.vocab_size].float()
    if ref_NV.shape != got_NV.shape:
        raise ConfigError(f"the student {type(model).__name__} returns logits of shape {tuple(ref_BLV.shape)}, not "
                          f"(batch, length, {spec.vocab_size}) from its output head; the loss cannot form them")
    scale = max(1.0, float(ref_NV.abs().max()))
    tol = (1e-4 if exact else 3e-2) * scale  # bf16 parameters (FSDP mixed precision): the model's matmul is bf16
    err = float((got_NV - ref_NV).abs().max())
    if not err <= tol:  # also NaN
        raise ConfigError(f"the logits of the student {type(model).__name__} are not a linear head over its last "
                          f"hidden state (with softcapping / logit_scale / logits_scaling from its config): they "
                          f"differ by {err:.3g} from what the loss would train; use a causal LM whose forward "
                          "returns lm_head(hidden state)")
