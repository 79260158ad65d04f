"""Per-chunk loss terms and their gradient w.r.t. the student's logits: the one place the divergence math lives.

Shapes: C rows of one chunk (every row counted), V compared vocabulary, K sparse ids per row.

`chunk_terms` is what the loss (losses.py) runs on each chunk of counted positions. It receives the student's
fp32 logits of the chunk, the targets, and the teacher's targets of the same rows in one of two forms:

- dense: (C, V) float32 teacher logits up to a constant per row (may contain -inf: probability zero), from a
  dense or factored store;
- sparse: SparseTargets at the training temperature (K ids with probabilities, optionally a rest bucket),
  from a `sampled` or `topk` store;

or None (plain CE). It returns the chunk's CE sum (at T = 1), the divergence sum (without the T^2 factor), and,
when asked, the gradient of ce_weight * CE + kd_weight * divergence w.r.t. the logits, in fp32. Nothing here
divides by a token count, and the caller's z_CV is never modified.

The divergences (`train.divergence`), per position, between the teacher p = p_T = softmax(t/T) and the student
q = q_T = softmax(z/T), over a set of outcomes o: the V tokens of a dense teacher, or the K ids plus one "rest"
bucket (every other token: the student's bucket mass is 1 - sum of its q at the ids) of a sparse one:

    forward_kl  KL(p || q) = sum_o p_o (log p_o - log q_o)             0 log 0 = 0: a -inf teacher logit costs 0
    reverse_kl  KL(q || p) = sum_o q_o (log q_o - log p_o)             +inf where p_o = 0 (see below)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (TRL's generalized JSD);
                beta = 0 is forward_kl and beta = 1 reverse_kl, exactly, as TRL and Liger special-case them (the
                formula itself tends to beta * KL(p || q) -> 0 as beta -> 0, and to (1 - beta) KL(q || p) at 1)
    tvd         0.5 sum_o |p_o - q_o|

and the loss is alpha * CE + (1 - alpha) * T^2 * D. The gradient, with a = z / T, is dD/dz = (1/T) dD/da and
dD/da_v = h_v - q_v * sum_o h_o, where h_o = Q_o dD/dQ_o is the outcome's share (Q_o the student's probability
of outcome o; a bucket token v gets q_v / Q_R * h_R):

    forward_kl  h_o = -p_o                        reverse_kl  h_o = q_o (log q_o - log p_o)
    jsd         h_o = (1 - beta) q_o (log q_o - log m_o)
    tvd         h_o = 0.5 q_o sign(q_o - p_o)     the subgradient with sign(0) = 0 where p_o == q_o exactly (0
                                                  lies in |x|'s subdifferential [-1, 1] at 0)

T^2: for forward KL, dD/dz = (q_T - p_T) / T, and near the teacher at large T, q_T - p_T ~ (z - t) / (V T):
the gradient shrinks as 1/T^2 and the T^2 factor keeps the KD term's weight against CE independent of T
(Hinton et al. 2015). reverse_kl and jsd agree with forward_kl to second order near the teacher (every
f-divergence is f''(1)/2 chi^2 there: 1 for both KLs, beta(1 - beta) for jsd), so T^2 does the same for them,
jsd's term being beta(1 - beta) times smaller. tvd is first order, its gradient shrinks as 1/T only, so under
the same T^2 its weight against CE grows as T: at T = 4 it weighs 4x more than at T = 1 (lower 1 - alpha to
compensate). T^2 is kept for every divergence so that alpha means one thing.

Zero teacher probabilities: forward_kl, jsd and tvd are finite on them (a token of probability zero costs
jsd (1 - beta) q log(1 / (1 - beta)), tvd q / 2). reverse_kl is +inf on any token of probability zero that
the student can reach, as in theory, and chunk_terms returns that. The stores that hold such zeros by
construction, dense-u8's dropped tail, refuse reverse_kl at train start (Codec.divergences); the others hold
a zero only where the teacher itself gives -inf.

Numerics: every log-probability is computed max-subtracted in log space (log_softmax, logsumexp), and the
teacher's sparse probabilities are read in log space where the codec gives them (topk at low T, where
softmax(r / T) underflows in fp32 while its log does not); products with a probability of exactly 0 are 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill_pipe.config import DIVERGENCES

NEG_INF = float("-inf")


def check_divergence(divergence: str, beta: float) -> None:
    """ValueError naming the params key when the divergence or beta is not one the loss computes."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"train.divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if not 0.0 <= beta <= 1.0:  # also rejects NaN
        raise ValueError(f"train.beta must be in [0, 1], got {beta}")


def resolve_divergence(divergence: str, beta: float) -> str:
    """The divergence computed: jsd with beta 0 is forward_kl and with beta 1 reverse_kl (TRL's, Liger's cases)."""
    check_divergence(divergence, beta)
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


@dataclass
class SparseTargets:
    """Sparse teacher targets of C positions at the training temperature (K ids each).

    ids_CK: int64 token ids; padding slots hold any valid id with probability 0 (such a slot is no outcome: with
    a rest bucket, its token belongs to the bucket).
    probs_CK: float32 teacher probabilities at T of those ids (an unbiased estimate for a sampled store).
    rest_C: float32 teacher mass outside the ids, matched by one bucket to the student's mass outside them;
    None when the ids carry all the mass (sampled).
    neg_entropy_C: float32 sum p log p of the teacher at T (the KL's constant; gradients do not depend on it).
    log_probs_CK, log_rest_C: the same probabilities in log space, float32, where the codec has them (None:
    log of the linear ones). At low T softmax(r / T) underflows to 0 in fp32 while its log stays finite, and
    reverse KL needs the log.
    """

    ids_CK: torch.Tensor
    probs_CK: torch.Tensor
    rest_C: torch.Tensor | None
    neg_entropy_C: torch.Tensor
    log_probs_CK: torch.Tensor | None = None
    log_rest_C: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids_CK.shape[0]

    def _map(self, fn) -> SparseTargets:
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return SparseTargets(f(self.ids_CK), f(self.probs_CK), f(self.rest_C), f(self.neg_entropy_C),
                             f(self.log_probs_CK), f(self.log_rest_C))

    def select(self, rows: torch.Tensor) -> SparseTargets:
        return self._map(lambda t: t.index_select(0, rows))

    def to(self, device) -> SparseTargets:
        return self._map(lambda t: t.to(device))

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log p at the ids (C, K), log of the rest bucket's mass (C,) or None), float32."""
        log_p = self.log_probs_CK if self.log_probs_CK is not None else self.probs_CK.float().log()
        log_r = self.log_rest_C if self.log_rest_C is not None or self.rest_C is None else self.rest_C.float().log()
        return log_p.float(), None if log_r is None else log_r.float()

    def within_vocab(self, vocab_size: int) -> SparseTargets:
        """The target over the first `vocab_size` tokens, the ones the student has logits for (ids beyond them
        belong to a teacher's padded vocabulary).

        With a rest bucket (topk) an outside id's mass joins the bucket, as the outside ids that missed the
        top k already did in the codec's tail mass, and its slot becomes padding (id 0, probability 0). Without
        one (sampled) the kept weights are scaled back to their total: the draws that fall inside are i.i.d.
        from the teacher renormalised over the shared vocabulary, what the dense codecs train against (their
        logits are sliced to it), so counts / (draws inside) is unbiased for it; a position whose draws all fell
        outside gets no target. The stored entropy stays the full teacher's (a constant of the KL's value)."""
        out_CK = self.ids_CK >= vocab_size
        if not out_CK.any():
            return self
        ids_CK = self.ids_CK.masked_fill(out_CK, 0)
        p_CK = self.probs_CK.float()
        kept_CK = p_CK.masked_fill(out_CK, 0.0)
        if self.rest_C is None:
            total_C1, inside_C1 = p_CK.sum(-1, keepdim=True), kept_CK.sum(-1, keepdim=True)
            scaled_CK = torch.where(inside_C1 > 0, kept_CK * (total_C1 / inside_C1), 0.0)
            return SparseTargets(ids_CK, scaled_CK, None, self.neg_entropy_C)
        log_p_CK, log_r_C = self.log_probs()
        moved_C = p_CK.masked_fill(~out_CK, 0.0).sum(-1)
        rest_C = self.rest_C.float() + moved_C
        log_rest_C = torch.logaddexp(log_r_C, log_p_CK.masked_fill(~out_CK, NEG_INF).logsumexp(-1))
        # sum p log p over the new outcomes: the moved ids' terms leave, the bucket's grows
        xlogx = lambda t: torch.special.xlogy(t, t)  # noqa: E731  (0 log 0 = 0)
        neg_entropy_C = (self.neg_entropy_C.float() - xlogx(p_CK.masked_fill(~out_CK, 0.0)).sum(-1)
                         - xlogx(self.rest_C.float()) + xlogx(rest_C))
        return SparseTargets(ids_CK, kept_CK, rest_C, neg_entropy_C, log_p_CK.masked_fill(out_CK, NEG_INF),
                             log_rest_C)


def chunk_terms(z_CV: torch.Tensor, y_C: torch.Tensor, teacher, *, ce_weight: float, kd_weight: float,
                temperature: float, build_grad: bool, divergence: str = "forward_kl",
                beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(CE sum, divergence sum, d(ce_weight*CE + kd_weight*div)/dz (C, V) fp32 or None) of one chunk.

    z_CV: (C, V) float32 student logits; y_C: (C,) int64 targets (all counted); teacher: (C, V) float32
    logits, SparseTargets of the same C rows, or None (then kd_weight must be 0 and the divergence is 0).
    divergence, beta: train.divergence and train.beta (the module docstring); sparse targets without a rest
    bucket (sampled) allow forward_kl only.
    """
    divergence = resolve_divergence(divergence, beta)
    y_C1 = y_C.unsqueeze(1)
    logp_CV = z_CV.log_softmax(-1)  # student at T=1 (a new tensor: z_CV is left as it was)
    ce = -logp_CV.gather(1, y_C1).sum()
    if isinstance(teacher, SparseTargets):
        if teacher.rest_C is None and divergence != "forward_kl":
            raise ValueError(f"train.divergence {divergence} needs the teacher's whole distribution or a rest bucket "
                             "(topk); these sparse targets have none (an estimate of the teacher, e.g. sampled): "
                             "use forward_kl")
        div, g_CV = _sparse_terms(logp_CV, y_C1, teacher, ce_weight, kd_weight, temperature, build_grad,
                                  divergence, beta)
        return ce, div, g_CV
    g_CV = None
    if build_grad:
        g_CV = logp_CV.exp_().scatter_add_(1, y_C1, torch.full_like(y_C1, -1, dtype=torch.float32))
        g_CV.mul_(ce_weight)  # ce_weight * (softmax(z) - onehot(y)); logp_CV is now consumed
    del logp_CV
    div = torch.zeros((), dtype=torch.float32, device=z_CV.device)
    if teacher is None:
        return ce, div, g_CV
    log_p_CV = (teacher.float() / temperature).log_softmax(-1)
    log_q_CV = (z_CV / temperature).log_softmax(-1)
    if divergence == "forward_kl":
        p_CV = log_p_CV.exp()
        # 0 * log 0 = 0: a -inf teacher logit (zero probability) must not give -inf - x = NaN.
        term_CV = (log_p_CV - log_q_CV).masked_fill_(p_CV == 0, 0.0).mul_(p_CV)
        div = term_CV.sum()
        del term_CV, log_p_CV
        if build_grad:  # d(kd_weight * KL)/dz = kd_weight / T * (q_T - p_T)
            g_CV.add_(log_q_CV.exp_().sub_(p_CV), alpha=kd_weight / temperature)
        return ce, div, g_CV
    d_CV, h_CV = _outcome_terms(divergence, beta, log_p_CV, log_q_CV)
    del log_p_CV
    div = d_CV.sum()
    del d_CV
    if build_grad:  # kd_weight / T * (h - q * sum_v h_v), every token its own outcome
        g_CV.add_(h_CV, alpha=kd_weight / temperature)
        g_CV.addcmul_(log_q_CV.exp_(), h_CV.sum(-1, keepdim=True), value=-kd_weight / temperature)
    return ce, div, g_CV


def _outcome_terms(divergence: str, beta: float, log_p: torch.Tensor,
                   log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's term of each outcome, h = Q dD/dQ of each outcome) for reverse_kl, jsd or tvd, from the teacher's
    and the student's log-probabilities of the same outcomes (any shape; the student's -inf only for an empty
    bucket, which then costs nothing). The module docstring has the formulas."""
    q = log_q.exp()
    if divergence == "reverse_kl":
        h = (log_q - log_p).mul_(q)
        h.masked_fill_(torch.isneginf(log_p), math.inf)  # q log(q / 0): infinite, as in theory
        h.masked_fill_(torch.isneginf(log_q), 0.0)
        return h, h
    if divergence == "jsd":
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        p = log_p.exp()
        # 0 * log 0 = 0 on either side (a -inf log-probability gives -inf - log m)
        teacher_side = (log_p - log_m).mul_(p).masked_fill_(p == 0, 0.0)
        h = (log_q - log_m).mul_(q).masked_fill_(q == 0, 0.0).mul_(1.0 - beta)
        return teacher_side.mul_(beta).add_(h), h
    assert divergence == "tvd", divergence
    p = log_p.exp()
    return (p - q).abs_().mul_(0.5), (q - p).sign_().mul_(q).mul_(0.5)


def _sparse_terms(logp_CV, y_C1, t: SparseTargets, ce_weight, kd_weight, temperature, build_grad, divergence,
                  beta) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(divergence sum of the chunk, gradient of ce_weight*CE + kd_weight*div w.r.t. z (C, V) or None) from K ids
    per position, and with a rest bucket R (topk) every other token as one outcome:

        forward_kl  KL = const - sum_k w_k log q_T(id_k) - m log Q_R   (const = sum p log p, stored by the codec;
                    a sampled store's targets w are an unbiased estimate of p_T, and so is this KL and its gradient)
        others      D over the K + 1 outcomes (_outcome_terms), the student's bucket Q_R = 1 - sum_k q_T(id_k)

    logp_CV: the student's log_softmax at T=1 (the CE term's); consumed. The student at T is its own log_softmax
    (max-subtracted: exp(logp / T) without the row max underflows in fp32 for T below ~0.12 with a near-uniform
    student over a large vocabulary). Q_R is summed from q_T outside the ids, exact to fp32 while Q_R >= 1e-30
    (every bucket token that matters is then a normal float); rows below that, a confident student at low T,
    take a logsumexp in log space."""
    same_t = temperature == 1.0
    log_q_CV = logp_CV if same_t else (logp_CV / temperature).log_softmax(-1)
    ids_CK = t.ids_CK.long()
    log_p_CK, log_r_C = t.log_probs()
    own_CK = ~torch.isneginf(log_p_CK)  # outcomes of their own; a zero-probability slot (padding) is none
    log_q_CK = log_q_CV.gather(1, ids_CK)
    q_CV = log_q_CV.exp()
    bucket = t.rest_C is not None
    if bucket:
        # q_T outside the own ids, 0 at them: a product is the same whichever of two slots of one id comes first
        bucket_CV = q_CV.scatter_reduce(1, ids_CK, (~own_CK).float(), reduce="prod")
        rest_C = bucket_CV.sum(-1)
        if bool((rest_C >= 1e-30).all()):
            log_q_R = rest_C.log()
            per_rest_C = 1.0 / rest_C  # a bucket token's q_v / Q_R = bucket_CV * per_rest_C
        else:
            in_ids_CV = torch.zeros_like(q_CV, dtype=torch.uint8).scatter_reduce_(
                1, ids_CK, own_CK.to(torch.uint8), reduce="amax").bool()
            log_q_R = log_q_CV.masked_fill(in_ids_CV, NEG_INF).logsumexp(-1)
            bucket_CV = (log_q_CV - log_q_R.unsqueeze(1)).exp_().masked_fill_(in_ids_CV, 0.0)  # q_v / Q_R
            per_rest_C = torch.ones_like(rest_C)
            del in_ids_CV
    del log_q_CV
    if divergence == "forward_kl":
        w_CK = t.probs_CK.float()
        div_C = t.neg_entropy_C.float() - (w_CK * log_q_CK).masked_fill_(~own_CK, 0.0).sum(-1)
        h_CK = -w_CK
        if bucket:
            m_C = t.rest_C.float()
            # 0 * log 0 = 0: no teacher mass in the bucket costs nothing, whatever the student puts there.
            div_C = div_C - (m_C * log_q_R).masked_fill_(m_C == 0, 0.0)
            h_R = -m_C
    else:
        d_CK, h_CK = _outcome_terms(divergence, beta, log_p_CK, log_q_CK)
        d_R, h_R = _outcome_terms(divergence, beta, log_r_C.unsqueeze(1), log_q_R.unsqueeze(1))
        div_C = d_CK.masked_fill(~own_CK, 0.0).sum(-1) + d_R.squeeze(1)
        h_R = h_R.squeeze(1)
    h_CK = h_CK.masked_fill(~own_CK, 0.0)
    div = div_C.sum()
    if not build_grad:
        return div, None
    scale = kd_weight / temperature  # d(kd_weight * div)/dz = kd_weight / T * d div / d(z/T)
    h_sum_C1 = h_CK.sum(-1, keepdim=True)
    if bucket:  # a bucket token v: q_v / Q_R * h_R
        h_sum_C1 = h_sum_C1 + h_R.unsqueeze(1)
    coef_C1 = h_sum_C1 * -scale  # - q_v * sum_o h_o
    if same_t:  # q_T is softmax(z): one product serves the KD and the CE terms
        coef_C1 = coef_C1 + ce_weight
    if bucket:
        g_CV = bucket_CV.mul_((h_R * per_rest_C * scale).unsqueeze(1)).addcmul_(q_CV, coef_C1)
    else:
        g_CV = q_CV.mul_(coef_C1)
    del q_CV
    if not same_t:
        g_CV.add_(logp_CV.exp_(), alpha=ce_weight)  # ce_weight * softmax(z)
    g_CV.scatter_add_(1, ids_CK, h_CK * scale)  # each id's own share (its bucket term is 0)
    g_CV.scatter_add_(1, y_C1, torch.full_like(y_C1, -ce_weight, dtype=torch.float32))
    return div, g_CV
