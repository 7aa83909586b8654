"""GSPO objective as pure torch functions: advantages, sequence/token losses, k3 KL.

GSPO is Zheng et al., "Group Sequence Policy Optimization", arXiv 2507.18071 (v2): eqs. 5-7 (sequence-level
ratio and clipped objective) and eqs. 13-14 (GSPO-token). ``tests/test_gspo_loss.py`` holds an independent
reference implementation of those equations (written from the paper, kept in the test) and checks that these
functions match it (loss and gradient) to float64 round-off.

Choices and deviations, each with its reason:

- **Clip range** ``eps_low=3e-4``, ``eps_high=4e-4`` for the sequence ratio (paper §5.1). The GRPO ablation
  (:func:`grpo_token_loss`) uses the paper's GRPO baseline, 0.2 / 0.27: the two ratios live on scales an order of
  magnitude apart.
- **No KL** in the loss: the paper omits it, and its first author recommends ``kl_loss_coef=0``. :func:`kl_k3` is
  provided for an optional ``beta * KL`` term, which the trainer adds (``beta=0`` by default).
- **Length normalisation**: ``s_i`` is the geometric mean of the token ratios over the valid tokens (eq. 7), so one
  clip range fits every length. The loss takes one value per sequence and averages over sequences ("seq-mean").
  Token-sum or global token-mean (DAPO style) would weight sequences by length, which is not GSPO.
- **Fully masked rows** (no valid token) contribute 0 to the loss and get a zero gradient, but they **count in the
  mean**: the loss is always ``sum_i loss_i / B`` (TRL's convention, spec §3 "mean over all B sequences"). The
  weight of a row is thus ``1/B`` whatever else the micro-batch holds, and gradient accumulation only needs to
  divide by the number of micro-batches. The spec's ``gspo_loss`` would add the constant ``-A_i/B`` (s=1, no
  gradient) for such a row; it is zeroed here so that :func:`gspo_loss`, :func:`gspo_token_loss` and TRL agree in
  value too. verl and OpenRLHF drop such rows from the denominator instead. Clip fractions of :func:`gspo_loss`
  are over all B rows (a fully masked row has ``s=1`` and is never clipped); token-level losses report them over
  valid tokens.
- **Padding**: every input is passed through ``torch.where(mask, x, 0)`` *before* any arithmetic, so -inf / NaN in
  padded ``logp``, ``old_logp``, ``ref_logp`` or token advantages give a finite loss and an exactly-zero gradient.
- **Precision**: losses are computed in at least float32 (bf16 / fp16 log-probs are upcast, the gradient flows
  back in the input dtype), because bf16's resolution near 1 (7.8e-3) cannot represent ``1 +- 3e-4``.
- **Advantages**: ``(r - group mean) / (Bessel std + eps)`` with ``eps=1e-4`` (as TRL), computed in float64 with an
  exact-zero guard ``where(max == min, 0, A)`` for zero-variance groups, returned in the rewards' dtype. In float32
  identical rewards give spurious same-sign advantages up to ~1e-3 (spec §5.1); ASR has many such groups. Options:
  batch scaling (centre per group, divide by the std of all rewards in the batch; TRL ``scale_rewards="batch"``)
  and no scaling (Dr. GRPO). Groups are contiguous rows; ``group_size >= 2`` (a singleton has no baseline).
- ``old_logp``, ``ref_logp`` and advantages are detached: they are constants of the surrogate objective.

Shapes: ``B`` sequences (prompts x G), ``T`` completion positions (right padded), ``G`` group size, ``K = B / G``.
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

__all__ = [
    "AdvantageScale",
    "batch_scaled_advantages",
    "compute_advantages",
    "grpo_token_loss",
    "group_advantages",
    "gspo_loss",
    "gspo_token_loss",
    "kl_k3",
    "zero_variance_groups",
]

AdvantageScale = Literal["group", "batch", "none"]


# --------------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """Reshape rewards to (K, G) float64, rejecting shapes that would silently mix prompts."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a group needs a baseline), got {group_size!r}")
    n = rewards.numel()
    if n == 0 or n % group_size != 0:
        raise ValueError(
            f"rewards.numel()={n} is not a positive multiple of group_size={group_size}: advantages are normalised"
            " within contiguous groups of G rows, so the batch must hold whole groups"
        )
    r = rewards.detach().reshape(-1, group_size).to(torch.float64)  # (K, G)
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite: a NaN/inf reward would poison every advantage of its group")
    return r


def _out_dtype(rewards: Tensor) -> torch.dtype:
    """Advantages come back in the rewards' dtype; integer rewards (e.g. exact match 0/1) get the default float."""
    return rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()


def _zero_variance(r: Tensor) -> Tensor:
    """(K, G) -> (K, 1) bool: the group's rewards are all identical (bitwise, in float64)."""
    return r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # (K, 1)


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """Flag groups whose G rewards are identical, so the trainer can drop them or log their fraction.

    Such groups carry no learning signal (all advantages are exactly 0); DAPO-style dynamic sampling drops them,
    TRL logs ``frac_reward_zero_std``.

    Args:
        rewards: (B,) rewards, rows ``[k*G:(k+1)*G]`` belong to prompt k.
        group_size: G.

    Returns:
        (K,) bool, True where the group has zero variance.
    """
    return _zero_variance(_grouped(rewards, group_size)).squeeze(1)  # (K,)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale_by_std: bool = True) -> Tensor:
    """Group-normalised advantages (GSPO eq. 6): ``(r - mean_group) / (std_group + eps)``.

    Computed in float64 with an exact-zero guard, because in float32 identical rewards give nonzero same-sign
    advantages (a spurious uniform push, spec §5.1). Std is Bessel-corrected, as in TRL and verl.

    Args:
        rewards: (B,) rewards, rows ``[k*G:(k+1)*G]`` belong to prompt k (any shape is flattened).
        group_size: G >= 2.
        eps: added to the std so near-constant groups do not explode.
        scale_by_std: False gives the Dr. GRPO advantage ``r - mean_group``.

    Returns:
        (B,) advantages in the rewards' dtype; exactly 0.0 for every row of a zero-variance group.

    Raises:
        ValueError: if ``group_size < 2``, ``rewards.numel()`` is not a multiple of it, or a reward is not finite.
    """
    r = _grouped(rewards, group_size)  # (K, G) float64
    centered = r - r.mean(dim=1, keepdim=True)  # (K, G)
    if scale_by_std:
        centered = centered / (r.std(dim=1, unbiased=True, keepdim=True) + eps)  # (K, G)
    centered = torch.where(_zero_variance(r), torch.zeros_like(centered), centered)  # (K, G)
    return centered.reshape(-1).to(_out_dtype(rewards))  # (B,)


def batch_scaled_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Centre per group, divide by the Bessel std of *all* rewards in the batch (+ eps).

    TRL's ``scale_rewards="batch"`` (LitePPO): a batch-level scale does not blow up groups whose rewards differ by
    a hair (e.g. WER 0.00 vs 0.01), which per-group std scaling turns into +-1 advantages.

    Args:
        rewards: (B,) rewards, rows ``[k*G:(k+1)*G]`` belong to prompt k.
        group_size: G >= 2.
        eps: added to the batch std.

    Returns:
        (B,) advantages in the rewards' dtype; exactly 0.0 for every row of a zero-variance group.
    """
    r = _grouped(rewards, group_size)  # (K, G) float64
    centered = (r - r.mean(dim=1, keepdim=True)) / (r.reshape(-1).std(unbiased=True) + eps)  # (K, G)
    centered = torch.where(_zero_variance(r), torch.zeros_like(centered), centered)  # (K, G)
    return centered.reshape(-1).to(_out_dtype(rewards))  # (B,)


def compute_advantages(rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4) -> Tensor:
    """Config-facing dispatcher: ``scale`` is "group" (GSPO eq. 6), "batch" (group mean, batch std) or "none"."""
    if scale == "group":
        return group_advantages(rewards, group_size, eps=eps, scale_by_std=True)
    if scale == "batch":
        return batch_scaled_advantages(rewards, group_size, eps=eps)
    if scale == "none":
        return group_advantages(rewards, group_size, eps=eps, scale_by_std=False)
    raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")


# --------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------


def _prepare(logp: Tensor, old_logp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate shapes, upcast to >= float32 and zero the padded slots before any arithmetic.

    Returns ``(valid, lp, olp, lengths)``: (B, T) bool, (B, T) masked logp (grad flows), (B, T) masked detached
    old logp, (B,) valid-token counts clamped to >= 1.
    """
    if logp.dim() != 2 or logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be (B, T); got {tuple(logp.shape)}, {tuple(old_logp.shape)},"
            f" {tuple(mask.shape)}"
        )
    dtype = torch.promote_types(logp.dtype, torch.float32)
    valid = mask.bool()  # (B, T)
    lp = torch.where(valid, logp.to(dtype), 0.0)  # (B, T)
    olp = torch.where(valid, old_logp.detach().to(dtype), 0.0)  # (B, T)
    lengths = valid.sum(dim=-1).clamp(min=1).to(dtype)  # (B,) |y_i|
    return valid, lp, olp, lengths


def _seq_advantages(advantages: Tensor, b: int, dtype: torch.dtype) -> Tensor:
    if advantages.shape != (b,):
        raise ValueError(f"advantages must be (B,) = ({b},), got {tuple(advantages.shape)}")
    return advantages.detach().to(dtype)  # (B,)


def _clip_stats(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, valid: Tensor | None = None
) -> dict[str, Tensor]:
    """Clip fractions in the advantage's direction (the only corners where the gradient is frozen).

    ``valid`` (same shape as ``ratio``) restricts the average to valid tokens; None averages over all entries.
    """
    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)  # (B,) or (B, T)
        high = (ratio > 1.0 + eps_high) & (adv > 0)  # (B,) or (B, T)
        valid = torch.ones_like(low) if valid is None else valid  # (B,) or (B, T)
        n = valid.sum().clamp(min=1).to(ratio.dtype)  # ()
        flags = {"clip_frac": low | high, "clip_frac_low": low, "clip_frac_high": high}
        return {k: (v & valid).sum().to(ratio.dtype) / n for k, v in flags.items()}


def gspo_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (eqs. 5-7) as a loss to minimise: ``-mean_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)``.

    The direct ``exp(mean log-ratio)`` form: autograd yields exactly eq. 10,
    ``dloss/dlogp_it = -A_i s_i m_it / (B |y_i|)`` outside the frozen clip corners.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (requires grad).
        old_logp: (B, T) the same under the behaviour policy (detached here); padding may hold -inf / NaN.
        mask: (B, T) 1 / True for completion tokens, 0 for padding.
        advantages: (B,) one advantage per sequence.
        eps_low: lower clip range (ratio floor ``1 - eps_low``).
        eps_high: upper clip range (ratio ceiling ``1 + eps_high``).

    Returns:
        ``(loss, stats)``: scalar loss (mean over all B rows; fully masked rows add 0), and detached stats
        ``seq_ratio`` (B,), ``clip_frac``, ``clip_frac_low`` (A<0, s<1-eps_low), ``clip_frac_high`` (A>0,
        s>1+eps_high), the fractions over the B rows.
    """
    valid, lp, olp, lengths = _prepare(logp, old_logp, mask)
    adv = _seq_advantages(advantages, lp.shape[0], lp.dtype)  # (B,)
    tok_log_ratio = lp - olp  # (B, T) log w_it; 0 in padding
    log_s = tok_log_ratio.sum(dim=-1) / lengths  # (B,) (1/|y_i|) sum_t log w_it
    s = torch.exp(log_s)  # (B,) s_i(theta)
    s_clip = torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high)  # (B,)
    per_seq = torch.minimum(s * adv, s_clip * adv)  # (B,) min(s A, clip(s) A)
    per_seq = torch.where(valid.any(dim=-1), per_seq, 0.0)  # (B,) fully masked rows add 0
    loss = -per_seq.mean()  # () mean over all B rows
    return loss, {"seq_ratio": s.detach(), **_clip_stats(s.detach(), adv, eps_low, eps_high)}


@overload
def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    token_advantages: Tensor,
    eps_low: float = ...,
    eps_high: float = ...,
    *,
    return_stats: Literal[False] = ...,
) -> Tensor: ...
@overload
def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    token_advantages: Tensor,
    eps_low: float = ...,
    eps_high: float = ...,
    *,
    return_stats: Literal[True],
) -> tuple[Tensor, dict[str, Tensor]]: ...
def gspo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    token_advantages: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    *,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """GSPO-token (eqs. 13-14): per-token advantages with ``s_it = sg[s_i] * pi_it / sg[pi_it]``.

    Lets a reward mark individual tokens (e.g. an inserted word) while keeping the sequence-level ratio and clip.
    With ``token_advantages = A_i`` broadcast it equals :func:`gspo_loss` in value, clip decision and gradient.

    Args:
        logp: (B, T) current-policy log-probs (requires grad).
        old_logp: (B, T) behaviour-policy log-probs; padding may hold -inf / NaN.
        mask: (B, T) 1 / True for completion tokens.
        token_advantages: (B, T) advantage per token; padding may hold garbage.
        eps_low: lower clip range.
        eps_high: upper clip range.
        return_stats: also return ``seq_ratio`` (B,) and token-level clip fractions (over valid tokens).

    Returns:
        The scalar loss (per-sequence token-mean, then mean over all B rows), or ``(loss, stats)``.
    """
    valid, lp, olp, lengths = _prepare(logp, old_logp, mask)
    if token_advantages.shape != lp.shape:
        raise ValueError(f"token_advantages must be (B, T) = {tuple(lp.shape)}, got {tuple(token_advantages.shape)}")
    adv = torch.where(valid, token_advantages.detach().to(lp.dtype), 0.0)  # (B, T)
    log_s = ((lp - olp).sum(dim=-1) / lengths).detach()  # (B,) sg[log s_i]
    s_it = torch.exp(lp - lp.detach() + log_s.unsqueeze(-1))  # (B, T) value s_i, grad of pi_it
    s_it_clip = torch.clamp(s_it, 1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    obj = torch.where(valid, torch.minimum(s_it * adv, s_it_clip * adv), 0.0)  # (B, T)
    loss = -(obj.sum(dim=-1) / lengths).mean()  # () seq-mean of token-means
    if not return_stats:
        return loss
    s = log_s.exp()  # (B,)
    return loss, {"seq_ratio": s, **_clip_stats(s_it.detach(), adv, eps_low, eps_high, valid=valid)}


def grpo_token_loss(
    logp: Tensor,
    old_logp: Tensor,
    mask: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.27,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO ablation: per-token ratio ``w_it = pi_it / old_it`` clipped per token (GSPO paper eq. 11 baseline).

    Aggregation is the same as GSPO's (per-sequence token-mean, then mean over all B rows), so the only
    difference in an ablation is the ratio's level. The defaults are the paper's GRPO clip range.

    Args:
        logp: (B, T) current-policy log-probs (requires grad).
        old_logp: (B, T) behaviour-policy log-probs; padding may hold -inf / NaN.
        mask: (B, T) 1 / True for completion tokens.
        advantages: (B,) one advantage per sequence.
        eps_low: lower clip range.
        eps_high: upper clip range.

    Returns:
        ``(loss, stats)``; ``seq_ratio`` (B,) is the geometric mean of the token ratios (the GSPO ``s_i``, for
        comparison), and the clip fractions are token-level over valid tokens.
    """
    valid, lp, olp, lengths = _prepare(logp, old_logp, mask)
    adv = _seq_advantages(advantages, lp.shape[0], lp.dtype).unsqueeze(-1)  # (B, 1)
    log_w = lp - olp  # (B, T) log w_it; 0 in padding
    w = torch.exp(log_w)  # (B, T) w_it
    w_clip = torch.clamp(w, 1.0 - eps_low, 1.0 + eps_high)  # (B, T)
    obj = torch.where(valid, torch.minimum(w * adv, w_clip * adv), 0.0)  # (B, T)
    loss = -(obj.sum(dim=-1) / lengths).mean()  # () seq-mean of token-means
    s = torch.exp(log_w.detach().sum(dim=-1) / lengths)  # (B,)
    return loss, {"seq_ratio": s, **_clip_stats(w.detach(), adv.expand_as(w), eps_low, eps_high, valid=valid)}


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 estimator of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` per token (>= 0, unbiased).

    Aggregated like the policy loss (per-sequence token-mean, then mean over all B rows; fully masked rows add 0)
    so ``loss + beta * kl`` weights every sequence equally. Not part of GSPO (the paper omits KL); ``beta=0`` by
    default in the trainer.

    Args:
        logp: (B, T) current-policy log-probs (requires grad).
        ref_logp: (B, T) reference-policy log-probs (detached here); padding may hold -inf / NaN.
        mask: (B, T) 1 / True for completion tokens.

    Returns:
        Scalar KL estimate.
    """
    valid, lp, rlp, lengths = _prepare(logp, ref_logp, mask)
    d = rlp - lp  # (B, T) log(pi_ref / pi); 0 in padding
    k3 = torch.where(valid, torch.exp(d) - d - 1.0, 0.0)  # (B, T)
    return (k3.sum(dim=-1) / lengths).mean()  # ()
