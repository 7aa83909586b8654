"""GSPO math against an independent reference implementation of the paper's equations, and its invariants.

Everything runs in float64 on CPU. The oracle below is copied verbatim from the spec so that the project code is
checked against an implementation it does not share code with.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from qwen3asr_train.rl.gspo import (
    batch_scaled_advantages,
    compute_advantages,
    group_advantages,
    grpo_token_loss,
    gspo_loss,
    gspo_token_loss,
    kl_k3,
    zero_variance_groups,
)

F64 = torch.float64
EL, EH = 3e-4, 4e-4


# ======================================================================================================================
# Oracle: a separate reference implementation of GSPO eqs. 5-7 and 13-14 (+ cross-check oracles), kept apart
# from qwen3asr_train/rl/gspo.py on purpose.
# Do not edit; names are prefixed ref_ only where they would clash with the imports above.
# ======================================================================================================================
# fmt: off


def ref_group_advantages(rewards, group_size, eps=1e-4, scale_by_std=True):
    """rewards: (B,) float, rows [k*G:(k+1)*G] belong to prompt k. Returns A: (B,)."""
    r = rewards.reshape(-1, group_size).to(torch.float64)
    centered = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:  # Bessel-corrected std, as in TRL (nanstd) and verl (torch.std)
        centered = centered / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    return centered.reshape(-1).to(rewards.dtype)


def ref_gspo_loss(logp, old_logp, mask, advantages, eps_low=3e-4, eps_high=4e-4):
    """GSPO (arXiv 2507.18071, eqs. 5-7) as a loss to minimise.

    logp:       (B, T) per-token log-probs of the sampled tokens under the current policy (requires grad)
    old_logp:   (B, T) same tokens under the behaviour/old policy (no grad)
    mask:       (B, T) 1 for completion tokens, 0 for padding
    advantages: (B,)   one advantage per sequence
    """
    m = mask.to(logp.dtype)
    lengths = m.sum(dim=-1).clamp(min=1.0)                                   # |y_i|
    tok_log_ratio = torch.where(m.bool(), logp - old_logp.detach(), torch.zeros_like(logp))
    log_s = tok_log_ratio.sum(dim=-1) / lengths                              # (1/|y_i|) sum_t log w_it
    s = torch.exp(log_s)                                                     # s_i(theta)
    s_clip = torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high)
    per_seq = torch.minimum(s * advantages, s_clip * advantages)             # min(s A, clip(s) A)
    loss = -per_seq.mean()                                                   # -(1/G) sum_i, averaged over prompts
    with torch.no_grad():
        clipped = ((s > 1 + eps_high) & (advantages > 0)) | ((s < 1 - eps_low) & (advantages < 0))
    return loss, {"seq_ratio": s.detach(), "clip_frac": clipped.float().mean()}


def ref_gspo_token_loss(logp, old_logp, mask, token_advantages, eps_low=3e-4, eps_high=4e-4):
    """GSPO-token (eqs. 13-14): s_it = sg[s_i] * pi/sg[pi]; token_advantages: (B, T)."""
    m = mask.to(logp.dtype)
    lengths = m.sum(dim=-1).clamp(min=1.0)
    tok_log_ratio = torch.where(m.bool(), logp - old_logp.detach(), torch.zeros_like(logp))
    log_s = (tok_log_ratio.sum(dim=-1) / lengths).detach()
    s_it = torch.exp(logp - logp.detach() + log_s.unsqueeze(-1))
    s_it_clip = torch.clamp(s_it, 1.0 - eps_low, 1.0 + eps_high)
    obj = torch.minimum(s_it * token_advantages, s_it_clip * token_advantages)
    per_seq = (obj * m).sum(dim=-1) / lengths
    return -per_seq.mean()


def trl_style(logp, old, mask, adv, el, eh):   # trl 1.16.0, importance_sampling_level="sequence", loss_type="grpo"
    liw = (((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    c1 = torch.exp(liw); c2 = torch.clamp(c1, 1 - el, 1 + eh); a = adv.unsqueeze(1)  # noqa: E702
    ptl = -torch.min(c1 * a, c2 * a)
    return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def verl_style(logp, old, mask, adv, el, eh):  # verl 0.9.1 gspo + agg_loss(seq-mean-token-mean)
    seq = ((logp - old) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    r = torch.exp(torch.clamp(logp - logp.detach() + seq.detach().unsqueeze(-1), max=10.0))
    A = adv.unsqueeze(1) * mask
    pg = torch.maximum(-A * r, -A * torch.clamp(r, 1 - el, 1 + eh))
    cnt = mask.sum(-1); per = (pg * mask).sum(-1) / (cnt + 1e-8); sm = (cnt > 0).to(per.dtype)  # noqa: E702
    return (per * sm).sum() / sm.sum()
# fmt: on


# ======================================================================================================================
# Helpers
# ======================================================================================================================


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0.0, equal_nan=False)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x)
    return g


def _right_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) float 0/1 right-padded mask."""
    return (torch.arange(t)[None, :] < lengths[:, None]).to(F64)


def _random_batch(seed: int, pad: str, b: int = 8, t: int = 9) -> tuple[torch.Tensor, ...]:
    """Right-padded batch with a per-row mix of off-policy scales (clipped and unclipped rows) and garbage padding.

    pad: "finite" (random padding everywhere), "neginf" (-inf old_logp, random logp), "nan" (NaN in both),
    "mixed" (-inf old_logp, NaN logp).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = _right_mask(lengths, t)  # (B, T)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3  # (B, T)
    scale = torch.tensor([0.0, 1e-5, 1e-4, 1e-3, 1e-2], dtype=F64)[torch.randint(0, 5, (b,), generator=g)]  # (B,)
    shift = (torch.rand(b, generator=g, dtype=F64) * 2 - 1) * 1.5e-3  # (B,)
    new = old + shift[:, None] + scale[:, None] * torch.randn(b, t, generator=g, dtype=F64)  # (B, T)
    junk = torch.randn(b, t, generator=g, dtype=F64) * 5  # (B, T)
    pad_old = {"finite": junk, "neginf": torch.full_like(old, -math.inf), "nan": torch.full_like(old, math.nan)}
    pad_old["mixed"] = pad_old["neginf"]
    pad_new = {"finite": -junk.abs(), "neginf": junk, "nan": torch.full_like(new, math.nan)}
    pad_new["mixed"] = pad_new["nan"]
    old = torch.where(mask.bool(), old, pad_old[pad])
    new = torch.where(mask.bool(), new, pad_new[pad]).requires_grad_(True)
    adv = torch.randn(b, generator=g, dtype=F64)  # (B,)
    return new, old, mask, adv


def _spec_fixture(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§4 fixture: B=8, T=7, lengths uniform in [2, T], old = -rand(B, T) * 3."""
    g = torch.Generator().manual_seed(seed)
    mask = _right_mask(torch.randint(2, 8, (8,), generator=g), 7)  # (B, T)
    old = -torch.rand(8, 7, generator=g, dtype=F64) * 3  # (B, T)
    return old, mask, g


# ======================================================================================================================
# Equality with the reference implementation
# ======================================================================================================================


@pytest.mark.parametrize("pad", ["finite", "neginf", "nan", "mixed"])
def test_gspo_loss_and_grad_match_reference(pad: str) -> None:
    n_clipped = n_unclipped = n_pos = n_neg = 0
    for seed in range(60):
        new, old, mask, adv = _random_batch(seed, pad)
        loss, stats = gspo_loss(new, old, mask, adv)
        ref_loss, ref_stats = ref_gspo_loss(new, old, mask, adv)
        assert torch.isfinite(loss)
        _close(loss, ref_loss)
        g = _grad(loss, new)
        _close(g, _grad(ref_loss, new))
        assert (g[mask == 0] == 0).all()
        _close(stats["seq_ratio"], ref_stats["seq_ratio"])
        _close(stats["clip_frac"], ref_stats["clip_frac"].to(F64), atol=1e-7)
        # a bool mask gives the same result
        _close(gspo_loss(new, old, mask.bool(), adv)[0], loss, atol=0.0)
        s = stats["seq_ratio"]
        clipped = ((s > 1 + EH) & (adv > 0)) | ((s < 1 - EL) & (adv < 0))
        n_clipped += int(clipped.sum())
        n_unclipped += int((~clipped).sum())
        n_pos += int((adv > 0).sum())
        n_neg += int((adv < 0).sum())
    assert min(n_clipped, n_unclipped, n_pos, n_neg) > 50  # the batches really cover every case


@pytest.mark.parametrize("pad", ["finite", "neginf"])
def test_gspo_token_loss_matches_reference(pad: str) -> None:
    # the reference itself yields NaN when logp's padding is NaN, so only finite logp garbage is compared here
    for seed in range(40):
        new, old, mask, _ = _random_batch(seed, pad)
        g = torch.Generator().manual_seed(1000 + seed)
        tok_adv = torch.randn(new.shape, generator=g, dtype=F64)  # (B, T) garbage in padding too
        loss = gspo_token_loss(new, old, mask, tok_adv)
        ref = ref_gspo_token_loss(new, old, mask, tok_adv)
        _close(loss, ref)
        _close(_grad(loss, new), _grad(ref, new))


def test_padding_nan_everywhere_is_harmless_for_every_loss() -> None:
    for seed in range(20):
        new, old, mask, adv = _random_batch(seed, "nan")
        tok_adv = torch.where(mask.bool(), adv[:, None].expand_as(mask), math.nan)  # (B, T) NaN padding
        losses = [
            gspo_loss(new, old, mask, adv)[0],
            gspo_token_loss(new, old, mask, tok_adv),
            grpo_token_loss(new, old, mask, adv)[0],
            kl_k3(new, old, mask),
        ]
        for loss in losses:
            g = _grad(loss, new)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            assert (g[mask == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_group_advantages_match_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for group_size in (2, 3, 4, 8, 16):
        rewards = torch.rand(group_size * 12, generator=g, dtype=F64).to(dtype)  # no constant groups
        for scale_by_std in (True, False):
            ours = group_advantages(rewards, group_size, scale_by_std=scale_by_std)
            assert ours.dtype == dtype
            torch.testing.assert_close(
                ours, ref_group_advantages(rewards, group_size, scale_by_std=scale_by_std), atol=0.0, rtol=0.0
            )


# ======================================================================================================================
# §4 invariants
# ======================================================================================================================


def test_invariant1_on_policy_ratio_one_and_grpo_gradient() -> None:
    old, mask, g = _spec_fixture(1)
    adv = group_advantages(torch.rand(8, generator=g, dtype=F64), 4)  # (B,)
    new = old.clone().requires_grad_(True)
    loss, stats = gspo_loss(new, old, mask, adv)
    assert (stats["seq_ratio"] == 1.0).all()
    assert abs(loss.item()) < 1e-9
    _close(loss, -adv.mean(), atol=1e-12)
    expected = -adv[:, None] * mask / (8 * mask.sum(-1, keepdim=True))  # (B, T) GRPO seq-mean gradient
    grad = _grad(loss, new)
    assert grad.abs().max() > 1e-3
    _close(grad, expected, atol=1e-12)


def test_invariant2_in_band_gradient_is_eq10() -> None:
    old, mask, g = _spec_fixture(2)
    adv = torch.randn(8, generator=g, dtype=F64)
    delta = torch.rand(8, generator=g, dtype=F64) * 5e-4 - 2e-4  # (B,) U(-2e-4, 3e-4)
    new = torch.where(mask.bool(), old + delta[:, None], old + 0.5).requires_grad_(True)  # garbage in padding
    loss, stats = gspo_loss(new, old, mask, adv)
    s = torch.exp(delta)  # (B,)
    _close(stats["seq_ratio"], s, atol=1e-12)
    assert stats["clip_frac"] == 0
    grad = _grad(loss, new)
    _close(grad, -adv[:, None] * s[:, None] * mask / (8 * mask.sum(-1, keepdim=True)), atol=1e-12)
    assert (grad[mask == 0] == 0).all()


def test_invariant3_clipping_freezes_only_the_advantage_direction() -> None:
    old, mask, _ = _spec_fixture(3)
    adv = torch.tensor([1.0, 1, -1, -1, 1, -1, 1, -1], dtype=F64)
    shift = torch.tensor([1e-3, -1e-3, -1e-3, 1e-3, 2e-4, -2e-4, 5e-4, -5e-4], dtype=F64)
    new = (old + shift[:, None] * mask).requires_grad_(True)
    loss, stats = gspo_loss(new, old, mask, adv)
    grad = _grad(loss, new)
    zero_rows = (grad == 0).all(dim=1)
    assert zero_rows.tolist() == [True, False, True, False, False, False, True, True]
    assert stats["clip_frac"].item() == 0.5
    assert stats["clip_frac_low"].item() == 0.25  # rows 2, 7: A < 0, s < 1 - eps_low
    assert stats["clip_frac_high"].item() == 0.25  # rows 0, 6: A > 0, s > 1 + eps_high
    # outside the frozen corners the gradient is eq. 10, unbounded by the clip
    s = torch.exp(shift)
    expected = -adv[:, None] * s[:, None] * mask / (8 * mask.sum(-1, keepdim=True))
    _close(grad[~zero_rows], expected[~zero_rows], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_invariant4_identical_rewards_give_exact_zero(dtype: torch.dtype) -> None:
    old, mask, g = _spec_fixture(4)
    rewards = torch.cat([torch.full((4,), 0.3, dtype=F64), torch.rand(4, generator=g, dtype=F64)]).to(dtype)
    adv = group_advantages(rewards, 4)
    assert (adv[:4] == 0.0).all() and (adv[4:] != 0).all()
    assert zero_variance_groups(rewards, 4).tolist() == [True, False]
    new = (old + 1e-4 * torch.randn(8, 7, generator=g, dtype=F64) * mask).requires_grad_(True)
    loss, _ = gspo_loss(new, old, mask, adv.to(F64))
    grad = _grad(loss, new)
    assert (grad[:4] == 0.0).all()
    sub_loss, _ = gspo_loss(new[4:], old[4:], mask[4:], adv[4:].to(F64))
    _close(loss, sub_loss * 4 / 8, atol=1e-15)  # the zero-variance rows add nothing (but count in the mean)


def test_invariant5_gspo_equals_gspo_token_trl_verl() -> None:
    for trial in range(20):
        old, mask, g = _spec_fixture(100 + trial)
        adv = group_advantages(torch.rand(8, generator=g, dtype=F64), 4)  # (B,)
        new = (old + 1e-3 * torch.randn(8, 7, generator=g, dtype=F64) * mask).requires_grad_(True)
        loss, stats = gspo_loss(new, old, mask, adv)
        tok_loss, tok_stats = gspo_token_loss(new, old, mask, adv[:, None].expand(8, 7), return_stats=True)
        grad = _grad(loss, new)
        _close(tok_loss, loss, atol=1e-12)
        _close(_grad(tok_loss, new), grad, atol=1e-12)
        _close(trl_style(new, old, mask, adv, EL, EH), loss, atol=1e-12)
        _close(_grad(trl_style(new, old, mask, adv, EL, EH), new), grad, atol=1e-12)
        _close(verl_style(new, old, mask, adv, EL, EH), loss, atol=1e-8)
        _close(_grad(verl_style(new, old, mask, adv, EL, EH), new), grad, atol=1e-8)
        # same clip decision: token-level fraction over valid tokens == row fraction weighted by length
        _close(tok_stats["seq_ratio"], stats["seq_ratio"], atol=1e-15)
        clipped_row = ((stats["seq_ratio"] > 1 + EH) & (adv > 0)) | ((stats["seq_ratio"] < 1 - EL) & (adv < 0))
        _close(tok_stats["clip_frac"], (clipped_row.to(F64) * mask.sum(-1)).sum() / mask.sum(), atol=1e-15)


@pytest.mark.parametrize("pad", ["neginf", "nan"])
def test_invariant6_padding_invariance(pad: str) -> None:
    old, mask, g = _spec_fixture(6)
    adv = torch.randn(8, generator=g, dtype=F64)
    new = old + 1e-3 * torch.randn(8, 7, generator=g, dtype=F64) * mask  # (B, T)
    x = new.clone().requires_grad_(True)
    loss, _ = gspo_loss(x, old, mask, adv)
    grad = _grad(loss, x)
    pad_old = torch.full((8, 3), -math.inf if pad == "neginf" else math.nan, dtype=F64)  # (B, 3)
    pad_new = torch.randn(8, 3, generator=g, dtype=F64) if pad == "neginf" else torch.full((8, 3), math.nan, dtype=F64)
    xp = torch.cat([new, pad_new], dim=1).requires_grad_(True)  # (B, T + 3)
    mask_p = torch.cat([mask, torch.zeros(8, 3, dtype=F64)], dim=1)  # (B, T + 3)
    loss_p, _ = gspo_loss(xp, torch.cat([old, pad_old], dim=1), mask_p, adv)
    grad_p = _grad(loss_p, xp)
    _close(loss_p, loss, atol=1e-15)
    _close(grad_p[:, :7], grad, atol=1e-15)
    assert (grad_p[:, 7:] == 0).all()


def test_invariant7_seq_ratio_is_length_independent() -> None:
    d = 2e-4
    mask = _right_mask(torch.arange(1, 9), 8)  # lengths 1..8
    old = -torch.rand(8, 8, generator=torch.Generator().manual_seed(7), dtype=F64) * 3
    _, stats = gspo_loss(old + d * mask, old, mask, torch.ones(8, dtype=F64))
    _close(stats["seq_ratio"], torch.full((8,), math.exp(d), dtype=F64), atol=1e-13)


# ======================================================================================================================
# Advantages: zero variance, batch scaling, validation
# ======================================================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_zero_variance_groups_are_exactly_zero_for_every_group_size(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, 0.1, 0.3, 1 / 3, 0.7, 1.0, -0.5, -1.0, 2 / 3, 0.9999], dtype=F64)
    consts = torch.cat([specials, torch.rand(300, generator=g, dtype=F64), torch.randn(90, generator=g, dtype=F64)])
    naive_nonzero = 0
    for group_size in range(2, 17):
        rewards = consts.repeat_interleave(group_size).to(dtype)  # (K*G,) every group constant
        for adv in (
            group_advantages(rewards, group_size),
            group_advantages(rewards, group_size, scale_by_std=False),
            batch_scaled_advantages(rewards, group_size),
        ):
            assert adv.dtype == dtype and (adv == 0.0).all()
        assert zero_variance_groups(rewards, group_size).all()
        # mixing in varied groups leaves the constant ones at exactly 0
        varied = torch.rand(5 * group_size, generator=g, dtype=F64).to(dtype)
        adv = group_advantages(torch.cat([rewards, varied]), group_size)
        assert (adv[: rewards.numel()] == 0.0).all() and (adv[rewards.numel() :] != 0).any()
        # the pitfall is real: the unguarded float32 formula gives nonzero values for some groups
        r32 = rewards.float().reshape(-1, group_size)
        naive = (r32 - r32.mean(1, keepdim=True)) / (r32.std(1, keepdim=True) + 1e-4)
        naive_nonzero += int((naive != 0).any())
    assert naive_nonzero > 0


def test_batch_scaled_advantages_match_hand_computation() -> None:
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 0.4, 0.6], dtype=F64)
    group_size, eps = 4, 1e-4
    values = rewards.tolist()
    batch_std = statistics.stdev(values)  # Bessel, over the whole batch
    expected = []
    for k in range(0, len(values), group_size):
        grp = values[k : k + group_size]
        mean = statistics.fmean(grp)
        expected += [0.0 if len(set(grp)) == 1 else (r - mean) / (batch_std + eps) for r in grp]
    ours = batch_scaled_advantages(rewards, group_size, eps=eps)
    _close(ours, torch.tensor(expected, dtype=F64), atol=1e-12)
    assert (ours[4:8] == 0.0).all()
    _close(compute_advantages(rewards, group_size, scale="batch", eps=eps), ours, atol=0.0)
    _close(compute_advantages(rewards, group_size, scale="group"), group_advantages(rewards, group_size), atol=0.0)
    none = compute_advantages(rewards, group_size, scale="none")
    _close(none, rewards - rewards.reshape(-1, 4).mean(1).repeat_interleave(4), atol=1e-15)


def test_advantage_input_validation() -> None:
    rewards = torch.rand(12, dtype=F64)
    for bad in (5, 0, -4, 1, 24, 2.0, True):
        with pytest.raises(ValueError):
            group_advantages(rewards, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple"):
        batch_scaled_advantages(rewards, 5)
    with pytest.raises(ValueError, match="multiple"):
        zero_variance_groups(rewards, 7)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.1, math.nan, 0.2, 0.3], dtype=F64), 2)
    with pytest.raises(ValueError, match="scale"):
        compute_advantages(rewards, 4, scale="token")  # type: ignore[arg-type]
    # integer rewards (exact match 0/1) give float advantages, not truncated ints
    assert group_advantages(torch.tensor([0, 1, 1, 1]), 4).is_floating_point()


def test_advantages_follow_whole_groups_under_shuffling() -> None:
    g = torch.Generator().manual_seed(11)
    rewards = torch.rand(6 * 4, generator=g, dtype=F64)
    perm = torch.randperm(6, generator=g)
    rows = (perm[:, None] * 4 + torch.arange(4)).reshape(-1)  # group-level shuffle
    torch.testing.assert_close(group_advantages(rewards[rows], 4), group_advantages(rewards, 4)[rows], atol=0, rtol=0)
    # the loss is a mean over rows, so shuffling rows (with their advantages) leaves it unchanged
    new, old, mask, adv = _random_batch(11, "neginf", b=24)
    p = torch.randperm(24, generator=g)
    _close(gspo_loss(new[p], old[p], mask[p], adv[p])[0], gspo_loss(new, old, mask, adv)[0], atol=1e-15)


# ======================================================================================================================
# Loss conventions and the other losses
# ======================================================================================================================


def test_fully_masked_row_contributes_zero_but_counts_in_mean() -> None:
    new, old, mask, adv = _random_batch(5, "finite")
    mask[3] = 0.0
    adv[3] = 2.0
    loss, stats = gspo_loss(new, old, mask, adv)
    ref_loss, _ = ref_gspo_loss(new, old, mask, adv)
    # the spec's loss adds -A_3/B for the empty row (s = 1, no gradient); ours adds 0 and keeps the 1/B weight
    _close(loss, ref_loss + adv[3] / 8, atol=1e-12)
    keep = torch.arange(8) != 3
    _close(loss, gspo_loss(new[keep], old[keep], mask[keep], adv[keep])[0] * 7 / 8, atol=1e-12)
    _close(loss, trl_style(new, old, mask, adv, EL, EH), atol=1e-12)
    _close(loss, gspo_token_loss(new, old, mask, adv[:, None].expand_as(mask)), atol=1e-12)
    grad = _grad(loss, new)
    _close(grad, _grad(ref_loss, new), atol=1e-12)
    assert (grad[3] == 0).all()
    assert stats["seq_ratio"][3] == 1.0
    # a batch with no valid token at all: zero, finite loss and gradient
    empty = torch.zeros_like(mask)
    loss0, stats0 = gspo_loss(new, old, empty, adv)
    assert loss0.item() == 0.0 and (_grad(loss0, new) == 0).all() and stats0["clip_frac"] == 0


def _grpo_by_hand(logp, old, mask, adv, el, eh):
    total = torch.zeros((), dtype=F64)
    clipped = valid = 0
    for i in range(logp.shape[0]):
        acc, n = torch.zeros((), dtype=F64), int(mask[i].sum())
        for t in range(logp.shape[1]):
            if mask[i, t]:
                w = torch.exp(logp[i, t] - old[i, t])
                acc = acc + torch.minimum(w * adv[i], torch.clamp(w, 1 - el, 1 + eh) * adv[i])
                clipped += int((w > 1 + eh and adv[i] > 0) or (w < 1 - el and adv[i] < 0))
                valid += 1
        total = total + acc / max(n, 1)
    return -total / logp.shape[0], clipped / valid


def test_grpo_token_loss_matches_hand_written_per_token_objective() -> None:
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        new, old, mask, adv = _random_batch(seed, "mixed")
        # per-token noise large enough to straddle the 0.2 / 0.27 band
        new = torch.where(mask.bool(), old + 0.3 * torch.randn(old.shape, generator=g, dtype=F64), new.detach())
        new.requires_grad_(True)
        loss, stats = grpo_token_loss(new, old, mask, adv)
        hand, clip_frac = _grpo_by_hand(new, old, mask, adv, 0.2, 0.27)
        _close(loss, hand, atol=1e-12)
        _close(_grad(loss, new), torch.nan_to_num(_grad(hand, new), nan=0.0), atol=1e-12)
        assert 0 < clip_frac < 1 and abs(stats["clip_frac"].item() - clip_frac) < 1e-12
        _close(stats["clip_frac"], stats["clip_frac_low"] + stats["clip_frac_high"], atol=1e-15)


def test_grpo_equals_gspo_gradient_on_policy() -> None:
    # on-policy both ratios are 1, so the gradients coincide (why GSPO only matters off-policy, spec §0.3)
    old, mask, g = _spec_fixture(9)
    adv = torch.randn(8, generator=g, dtype=F64)
    x = old.clone().requires_grad_(True)
    _close(_grad(grpo_token_loss(x, old, mask, adv)[0], x), _grad(gspo_loss(x, old, mask, adv)[0], x), atol=1e-15)


def test_kl_k3_matches_hand_computation() -> None:
    new, ref, mask, _ = _random_batch(3, "mixed")
    kl = kl_k3(new, ref, mask)
    per_seq = []
    for i in range(8):
        terms = [
            math.exp(ref[i, t].item() - new[i, t].item()) - (ref[i, t].item() - new[i, t].item()) - 1
            for t in range(mask.shape[1])
            if mask[i, t]
        ]
        per_seq.append(sum(terms) / max(len(terms), 1))
    _close(kl, torch.tensor(sum(per_seq) / 8, dtype=F64), atol=1e-12)
    assert kl >= 0
    x = ref.clone().nan_to_num(neginf=0.0).requires_grad_(True)
    kl0 = kl_k3(x, ref, mask)
    assert kl0 == 0 and (_grad(kl0, x) == 0).all()


def test_stats_are_detached_and_complete() -> None:
    new, old, mask, adv = _random_batch(0, "neginf")
    keys = {"seq_ratio", "clip_frac", "clip_frac_low", "clip_frac_high"}
    for _, stats in (
        gspo_loss(new, old, mask, adv),
        gspo_token_loss(new, old, mask, adv[:, None].expand_as(mask), return_stats=True),
        grpo_token_loss(new, old, mask, adv),
    ):
        assert set(stats) == keys and stats["seq_ratio"].shape == (8,)
        assert not any(v.requires_grad for v in stats.values())


def test_low_precision_logp_is_upcast() -> None:
    new, old, mask, adv = _random_batch(2, "neginf")
    x = new.detach().to(torch.bfloat16).requires_grad_(True)
    loss, stats = gspo_loss(x, old.float(), mask, adv.float())
    assert loss.dtype == torch.float32 and stats["seq_ratio"].dtype == torch.float32
    assert _grad(loss, x).dtype == torch.bfloat16
    _close(loss, gspo_loss(x.detach().float(), old.float(), mask, adv.float())[0], atol=0.0)


def test_shape_validation() -> None:
    new, old, mask, adv = _random_batch(0, "finite")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        gspo_loss(new, old[:, :-1], mask, adv)
    with pytest.raises(ValueError, match="advantages"):
        gspo_loss(new, old, mask, adv[:-1])
    with pytest.raises(ValueError, match="token_advantages"):
        gspo_token_loss(new, old, mask, adv)
