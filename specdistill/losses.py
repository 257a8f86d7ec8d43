"""Shared losses: pure functions of tensors, one row per token (DESIGN.md "losses.py").

Every function returns per-row losses reduced by `reduction` ("none" -> (N,), "sum", "mean"). The
drafters pass "sum" because `LossOutput.loss` is a sum the Trainer normalises by the global token
count. Inputs are cast to float32 before any softmax so bf16 autocast does not lose the tails.

Conventions: `student` / `teacher` are logits (N, V) unless the name says `logp` or `probs`; the
teacher is never differentiated through (callers pass detached tensors; we detach again to be sure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "sum", "mean")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return x
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        return x.mean() if x.numel() else x.sum()
    raise ValueError(f"reduction ({reduction!r}) must be one of {_REDUCTIONS}")


def _logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def cross_entropy(student: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Hard-label cross-entropy -log q(y), (N, V) logits and (N,) labels; rows with label -100 count 0."""
    per = F.cross_entropy(student.float(), labels, ignore_index=-100, reduction="none")
    return _reduce(per, reduction)


def soft_cross_entropy(student: torch.Tensor, teacher_logp: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """-sum_v p(v) log q(v) with p = exp(teacher_logp): the EAGLE token loss.

    EAGLE (Li et al. 2024, arXiv 2401.15077) eq. (2) writes L_cls = CrossEntropy(p_{j+2}, p^_{j+2}),
    with p the target's distribution (not its sampled token). Its gradient equals forward KL's.
    """
    p = teacher_logp.detach().float().exp()
    return _reduce(_neg_expected_logq(student, p), reduction)


def _neg_expected_logq(student: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v) = logsumexp(z) - sum_v p(v) z(v) for rows with sum_v p = 1.

    Never materialises log_softmax(z): on a (tokens x 8192) output layer that saves several
    memory-bound passes per unrolled step, and the gradient softmax(z) - p comes out directly.
    """
    z = student.float()
    return torch.logsumexp(z, -1) - (p * z).sum(-1)


def forward_kl(student: torch.Tensor, teacher_logp: torch.Tensor | None, reduction: str = "sum",
               teacher_probs: torch.Tensor | None = None, teacher_neg_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q); p = teacher, q = student (mode-covering).

    The EAGLE-3 token loss (arXiv 2503.01840, Sec. 3.2: the draft is trained to match the target's
    distribution at every training-time-test step) and DistillSpec's FKL (arXiv 2310.08461, Table 1).
    Zero iff q == p; differs from `soft_cross_entropy` by the teacher entropy only.
    `teacher_probs` (= exp(teacher_logp)) and `teacher_neg_entropy` (= sum p log p per row) may be
    passed when one teacher serves several students (EAGLE-3's unrolled steps) to skip recomputing them.
    """
    with torch.no_grad():
        # With teacher_probs given, teacher_logp is not read (callers may pass None).
        p = teacher_logp.detach().float().exp() if teacher_probs is None else teacher_probs.detach().float()
        if teacher_neg_entropy is None:
            # xlogy gives 0 * log 0 = 0: a teacher can hold exact zeros (-inf log-probs).
            teacher_neg_entropy = torch.special.xlogy(p, p).sum(-1)
    return _reduce(teacher_neg_entropy + _neg_expected_logq(student, p), reduction)


class _ChunkedForwardKL(torch.autograd.Function):
    """Row-chunked -sum_v p log q(z) with its own backward (softmax(z) - p) * g.

    Autograd would materialise ~6 full (tokens x V) fp32 intermediates per call; at 1.6k tokens x
    8192 words each is 54 MB, larger than the L3 cache, so the loss becomes memory-bound. Working
    on row chunks keeps every intermediate in cache and never stores one across forward/backward.
    """

    @staticmethod
    def forward(ctx, z, p, chunk):
        n = z.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=z.device)
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        top = torch.empty(n, dtype=torch.long, device=z.device)
        for i in range(0, n, chunk):
            zc = z[i:i + chunk].float()
            lse[i:i + chunk] = torch.logsumexp(zc, -1)
            loss[i:i + chunk] = lse[i:i + chunk] - (p[i:i + chunk] * zc).sum(-1)
            top[i:i + chunk] = zc.argmax(-1)
        ctx.save_for_backward(z, p, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(top)
        return loss, top

    @staticmethod
    def backward(ctx, g, _g_top):
        z, p, lse = ctx.saved_tensors
        grad = torch.empty_like(z)
        for i in range(0, z.shape[0], ctx.chunk):
            q = (z[i:i + ctx.chunk].float() - lse[i:i + ctx.chunk, None]).exp_()
            grad[i:i + ctx.chunk] = q.sub_(p[i:i + ctx.chunk]).mul_(g[i:i + ctx.chunk, None])
        return grad, None, None


def forward_kl_chunked(student: torch.Tensor, teacher_probs: torch.Tensor, teacher_neg_entropy: torch.Tensor | None = None,
                       chunk_rows: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row forward KL(p || softmax(student)) and the student's argmax, computed in row chunks.

    Same value and gradient as `forward_kl(..., reduction="none")` (tested), for the large output
    layers of drafters: the logits may be bf16 (autocast); the loss is always accumulated in fp32.
    """
    p = teacher_probs.detach().float()
    if teacher_neg_entropy is None:
        teacher_neg_entropy = torch.special.xlogy(p, p).sum(-1)
    ce, top = _ChunkedForwardKL.apply(student, p, max(1, int(chunk_rows)))
    return teacher_neg_entropy.detach() + ce, top


def reverse_kl(student: torch.Tensor, teacher_logp: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p) (mode-seeking); DistillSpec (arXiv 2310.08461) RKL."""
    lq = _logp(student)
    q = lq.exp()
    lp = teacher_logp.detach().float()
    per = torch.where(q > 0, q * (lq - lp), torch.zeros_like(q)).sum(-1)
    return _reduce(per, reduction)


def jsd(student: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5, reduction: str = "sum") -> torch.Tensor:
    """Generalised Jensen-Shannon divergence JSD(beta) (GKD, Agarwal et al. 2024, arXiv 2306.13649, eq. 3).

    m = beta * p + (1 - beta) * q;  JSD = beta * KL(p || m) + (1 - beta) * KL(q || m), p = teacher.
    beta = 0.5 is the symmetric JSD. The endpoints follow TRL's GKDTrainer (`generalized_jsd_loss`,
    FAMILIES.md C3): beta = 0 is forward KL(p || q), beta = 1 is reverse KL(q || p) (the formula
    itself tends to 0 there), so the same `beta` means the same loss as in TRL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta ({beta}) must be in [0, 1]")
    if beta == 0.0:
        return forward_kl(student, teacher_logp, reduction)
    if beta == 1.0:
        return reverse_kl(student, teacher_logp, reduction)
    lq = _logp(student)
    lp = teacher_logp.detach().float()
    lm = torch.logsumexp(torch.stack([lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1 - beta))]), 0)
    p, q = lp.exp(), lq.exp()
    kl_pm = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1)
    return _reduce(beta * kl_pm + (1 - beta) * kl_qm, reduction)


def tvd(student: torch.Tensor, teacher_logp: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p - q|; DistillSpec (arXiv 2310.08461) TVD.

    1 - TVD(p, q) is the expected acceptance rate of one speculative-sampling step (Leviathan et al.
    2023, arXiv 2211.17192, Sec. 3.1), which is why DistillSpec trains on it directly.
    """
    q = _logp(student).exp()
    p = teacher_logp.detach().float().exp()
    return _reduce(0.5 * (p - q).abs().sum(-1), reduction)


def topk_kd(student: torch.Tensor, teacher_logp: torch.Tensor, k: int, reduction: str = "sum") -> torch.Tensor:
    """Top-K distillation: -sum_{v in topK(p)} p(v) log q(v).

    HASS "harmonized objective distillation" (Zhang et al. 2024, arXiv 2408.15766, Sec. 3.1, eq. 4):
    only the K most likely target tokens are ranked at decoding time, so the loss focuses the
    drafter's capacity on them. With K = V it equals `soft_cross_entropy`.
    """
    if k < 1:
        raise ValueError(f"topk_kd k ({k}) must be >= 1")
    lp = teacher_logp.detach().float()
    k = min(k, lp.shape[-1])
    top_lp, idx = lp.topk(k, dim=-1)
    z = student.float()
    w = top_lp.exp()
    # log q(v) = z(v) - logsumexp(z): gather K logits instead of a full log_softmax.
    per = w.sum(-1) * torch.logsumexp(z, -1) - (w * z.gather(-1, idx)).sum(-1)
    return _reduce(per, reduction)


def feature_regression(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    """Smooth-L1 feature regression, mean over the feature dim, one value per row.

    EAGLE (arXiv 2401.15077) eq. (1): L_reg = SmoothL1(f_{j+1}, f^_{j+1}); the per-token mean over
    hidden units follows the reference implementation so the weight 1.0 vs 0.1 of L_cls transfers.
    """
    per = F.smooth_l1_loss(pred.float(), target.detach().float(), beta=beta, reduction="none").mean(-1)
    return _reduce(per, reduction)


def ctc(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor, target_lengths: torch.Tensor,
        blank: int = 0, reduction: str = "sum") -> torch.Tensor:
    """CTC loss -log sum_{alignments} prod q (Graves et al. 2006), as used by the CTC drafter
    (Wen, Gui, Feng, NeurIPS 2024, arXiv 2412.00061; specdistill/drafters/ctc.py).

    log_probs: (T, N, C) log-softmax outputs; targets: (N, S) padded labels. Infeasible alignments
    give 0 (zero_infinity) instead of inf so one bad sample cannot poison a batch.
    """
    per = F.ctc_loss(log_probs.float(), targets, input_lengths, target_lengths, blank=blank,
                     reduction="none", zero_infinity=True)
    return _reduce(per, reduction)
