"""Per-chunk loss terms and their gradient w.r.t. the student's logits: the one place the divergence math lives.

Shapes: C rows of one chunk (every row counted), V compared vocabulary, K sparse ids per row.

`chunk_terms` is what the loss (losses.py) runs on each chunk of counted positions. It receives the student's
fp32 logits of the chunk, the targets, and the teacher's targets of the same rows in one of two forms:

- dense: (C, V) float32 teacher logits up to a constant per row (may contain -inf: probability zero), from a
  dense or factored store;
- sparse: losses.SparseTargets at the training temperature (K ids with probabilities, optionally a rest bucket),
  from a `sampled` or `topk` store;

or None (plain CE). It returns the chunk's CE sum (at T = 1), the divergence sum (without the T^2 factor), and,
when asked, the gradient of ce_weight * CE + kd_weight * divergence w.r.t. the logits, in fp32. Nothing here
divides by a token count, and the caller's z_CV is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTargets:
    """Sparse teacher targets of C positions at the training temperature (K ids each).

    ids_CK: int64 token ids; padding slots hold any valid id with probability 0.
    probs_CK: float32 teacher probabilities at T of those ids (an unbiased estimate for a sampled store).
    rest_C: float32 teacher mass outside the ids, matched by one bucket to the student's mass outside them;
    None when the ids carry all the mass (sampled).
    neg_entropy_C: float32 sum p log p of the teacher at T (the KL's constant; gradients do not depend on it).
    """

    ids_CK: torch.Tensor
    probs_CK: torch.Tensor
    rest_C: torch.Tensor | None
    neg_entropy_C: torch.Tensor

    def __len__(self) -> int:
        return self.ids_CK.shape[0]

    def select(self, rows: torch.Tensor) -> SparseTargets:
        pick = lambda t: None if t is None else t.index_select(0, rows)
        return SparseTargets(pick(self.ids_CK), pick(self.probs_CK), pick(self.rest_C), pick(self.neg_entropy_C))

    def within_vocab(self, vocab_size: int) -> SparseTargets:
        """Ids at or beyond `vocab_size` (a teacher's padded vocabulary) leave the target (probability 0)."""
        out = self.ids_CK >= vocab_size
        if not out.any():
            return self
        return SparseTargets(self.ids_CK.masked_fill(out, 0), self.probs_CK.masked_fill(out, 0.0), self.rest_C,
                             self.neg_entropy_C)

    def to(self, device) -> SparseTargets:
        move = lambda t: None if t is None else t.to(device)
        return SparseTargets(move(self.ids_CK), move(self.probs_CK), move(self.rest_C), move(self.neg_entropy_C))


def chunk_terms(z_CV: torch.Tensor, y_C: torch.Tensor, teacher, *, ce_weight: float, kd_weight: float,
                temperature: float, build_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CE sum, divergence sum, d(ce_weight*CE + kd_weight*div)/dz (C, V) fp32 or None) of one chunk.

    z_CV: (C, V) float32 student logits; y_C: (C,) int64 targets (all counted); teacher: (C, V) float32
    logits, SparseTargets of the same C rows, or None (then kd_weight must be 0 and the divergence is 0).
    """
    y_C1 = y_C.unsqueeze(1)
    logp_CV = z_CV.log_softmax(-1)  # student at T=1 (a new tensor: z_CV is left as it was)
    ce = -logp_CV.gather(1, y_C1).sum()
    if isinstance(teacher, SparseTargets):
        div, g_CV = _sparse_forward_kl(logp_CV, y_C1, teacher, ce_weight, kd_weight, temperature, build_grad)
        return ce, div, g_CV
    g_CV = None
    if build_grad:
        g_CV = logp_CV.exp_().scatter_add_(1, y_C1, torch.full_like(y_C1, -1, dtype=torch.float32))
        g_CV.mul_(ce_weight)  # ce_weight * (softmax(z) - onehot(y)); logp_CV is now consumed
    del logp_CV
    div = torch.zeros((), dtype=torch.float32, device=z_CV.device)
    if teacher is not None:
        log_p_CV = (teacher.float() / temperature).log_softmax(-1)
        p_CV = log_p_CV.exp()
        log_q_CV = (z_CV / temperature).log_softmax(-1)
        # 0 * log 0 = 0: a -inf teacher logit (zero probability) must not give -inf - x = NaN.
        term_CV = (log_p_CV - log_q_CV).masked_fill_(p_CV == 0, 0.0).mul_(p_CV)
        div = term_CV.sum()
        del term_CV, log_p_CV
        if build_grad:  # d(kd_weight * KL)/dz = kd_weight / T * (q_T - p_T)
            g_CV.add_(log_q_CV.exp_().sub_(p_CV), alpha=kd_weight / temperature)
        del p_CV, log_q_CV
    return ce, div, g_CV


def _sparse_forward_kl(logp_CV, y_C1, t: SparseTargets, ce_weight, kd_weight, temperature,
                       build_grad) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(forward-KL sum of the chunk, gradient of ce_weight*CE + kd_weight*KL w.r.t. z (C, V) or None).

    For K ids per position with teacher probabilities w_k at T, optionally a "rest" bucket of mass m matched to
    the student's own mass outside the ids, q_rest = 1 - sum_k q_k:

        KL  = const - sum_k w_k log q_T(id_k) - m log q_rest        (const = sum p log p, stored by the codec)
        dKL/d(z/T) = (sum_k w_k + m) q_T - scatter(w) - m * q_T * [v not in ids] / q_rest

    logp_CV: the student's log_softmax at T=1 (the CE term's); consumed (it becomes the gradient). The student
    at T comes from it: e = exp(logp / T) = q_T * s per row (s = sum e), so no second log_softmax is needed,
    and at T = 1 e is the CE term's softmax itself."""
    same_t = temperature == 1.0
    ids_CK, w_CK = t.ids_CK.long(), t.probs_CK.float()
    e_CV = logp_CV.exp() if same_t else logp_CV.mul(1.0 / temperature).exp_()
    s_C1 = e_CV.sum(-1, keepdim=True)
    log_q_CK = logp_CV.gather(1, ids_CK).div_(temperature).sub_(s_C1.log())  # log q_T at the ids
    kl_C = t.neg_entropy_C.float() - (w_CK * log_q_CK).sum(-1)
    mass_C1 = w_CK.sum(-1, keepdim=True)
    if t.rest_C is not None:
        m_C1 = t.rest_C.float().unsqueeze(1)
        rest_C1 = e_CV.scatter(1, ids_CK, 0.0).sum(-1, keepdim=True)  # the student's mass outside the ids, * s
        # 0 * log 0 = 0: no teacher mass in the bucket costs nothing, whatever the student puts there.
        kl_C = kl_C - (m_C1 * (rest_C1.log() - s_C1.log())).masked_fill_(m_C1 == 0, 0.0).squeeze(1)
        mass_C1 = mass_C1 + m_C1
    kl = kl_C.sum()
    if not build_grad:
        return kl, None
    scale = kd_weight / temperature  # d(kd_weight * KL)/dz = kd_weight / T * dKL/d(z/T)
    # dKL/d(z/T) = mass * q_T - w at the ids - m * q_T / q_rest outside them  (q_T = e / s, q_rest = rest / s)
    coef_C1 = mass_C1 * scale / s_C1
    at_ids_CK = w_CK * -scale
    if t.rest_C is not None:
        bucket_C1 = torch.where(rest_C1 > 0, m_C1 * scale / rest_C1, 0.0)
        coef_C1 = coef_C1 - bucket_C1
        at_ids_CK = at_ids_CK + bucket_C1 * e_CV.gather(1, ids_CK)  # the ids are not in the bucket
    if same_t:  # ce_weight * softmax(z) + coef * e, with e = softmax(z)
        g_CV = e_CV.mul_(coef_C1 + ce_weight)
        del logp_CV
    else:
        g_CV = e_CV.mul_(coef_C1).add_(logp_CV.exp_(), alpha=ce_weight)
    g_CV.scatter_add_(1, y_C1, torch.full_like(y_C1, -ce_weight, dtype=torch.float32))
    g_CV.scatter_add_(1, ids_CK, at_ids_CK)
    return kl, g_CV
