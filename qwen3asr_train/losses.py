"""Losses as small pure functions (shape comments on every tensor line).

``target_token_ce`` computes the LM head only at positions that predict a labelled token: most
positions of an ASR sequence are audio placeholders and prompt, and full 151,936-way logits at every
position are what makes the upstream recipe run out of memory. It returns a *sum* (and the count) so
the caller decides the normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE_INDEX = -100


def target_token_ce(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int = 0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and the number of labelled tokens.

    Args:
        hidden: ``(B, L, H)`` last hidden states of the decoder.
        labels: ``(B, L)`` labels aligned with the input ids (``-100`` = not trained); position ``t``
            is predicted from the hidden state at ``t - 1``.
        head: the LM head (``Linear(H, V)``).
        chunk_tokens: > 0: evaluate the head and the loss ``chunk_tokens`` targets at a time, each chunk
            recomputed in backward (:func:`chunked_head_ce`), so no ``(N, V)`` fp32 logits tensor exists;
            0: all targets at once.
        label_smoothing: ε of PyTorch's label smoothing: each target's distribution is
            ``(1 - ε) · one-hot + ε / V`` over the whole vocabulary, so the loss per target is
            ``(1 - ε) · NLL + ε · mean over v of -log p(v)``. 0: plain cross-entropy.
    """
    target = labels[:, 1:]  # (B, L-1)
    mask = target != IGNORE_INDEX  # (B, L-1)
    picked = hidden[:, :-1][mask]  # (N, H)
    if chunk_tokens > 0:
        return chunked_head_ce(picked, target[mask], head, chunk_tokens, label_smoothing), mask.sum()
    logits = head(picked).float()  # (N, V) — fp32 for a stable log-softmax under bf16 autocast
    loss_sum = F.cross_entropy(logits, target[mask], reduction="sum", label_smoothing=label_smoothing)  # ()
    return loss_sum, mask.sum()


def _head_ce_sum(
    hidden: torch.Tensor, target: torch.Tensor, head: torch.nn.Module, label_smoothing: float = 0.0
) -> torch.Tensor:
    logits = head(hidden).float()  # (C, V)
    return F.cross_entropy(logits, target, reduction="sum", label_smoothing=label_smoothing)  # ()


def chunked_head_ce(
    hidden: torch.Tensor,
    target: torch.Tensor,
    head: torch.nn.Module,
    chunk_tokens: int,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``target``, ``chunk_tokens`` rows at a time.

    Why: with the real 151,936-token vocabulary the logits of ``N`` targets are ``N × 151,936`` fp32 values
    (600 KB per target), and autograd keeps them (and the log-softmax) until backward. Each chunk here runs
    under non-reentrant activation checkpointing, so forward keeps only its ``(C, H)`` input and backward
    recomputes one chunk's logits at a time: peak memory is one chunk's logits instead of all of them, for
    one extra head matmul per target. The result and gradients equal the unchunked loss up to summation
    order (tests/test_memory_features.py).

    Args:
        hidden: ``(N, H)`` hidden states at the positions that predict a target.
        target: ``(N,)`` target ids.
        head: ``Linear(H, V)`` (or any module mapping ``(C, H)`` to ``(C, V)``).
        chunk_tokens: rows per chunk (> 0).
        label_smoothing: as in :func:`target_token_ce`.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.shape[0] == 0:  # keep the graph (a zero loss still connected to the head)
        return _head_ce_sum(hidden, target, head, label_smoothing)
    total = hidden.new_zeros((), dtype=torch.float32)  # ()
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start : start + chunk_tokens]  # (C, H)
        t = target[start : start + chunk_tokens]  # (C,)
        if torch.is_grad_enabled():
            part = torch.utils.checkpoint.checkpoint(_head_ce_sum, h, t, head, label_smoothing, use_reentrant=False)
        else:
            part = _head_ce_sum(h, t, head, label_smoothing)
        total = total + part
    return total


def audio_ctc(
    audio_hidden: torch.Tensor,
    audio_lengths: torch.Tensor,
    targets: list[torch.Tensor],
    head: torch.nn.Module,
    blank_id: int,
) -> torch.Tensor:
    """Summed CTC loss of transcript tokens on the projected audio states (auxiliary, from-scratch runs).

    Args:
        audio_hidden: ``(N_audio, H)`` projector outputs of all rows, packed in row order.
        audio_lengths: ``(B,)`` audio tokens per row.
        targets: ``B`` tensors of transcript token ids.
        head: the LM head (tied to the embeddings), so CTC shapes the same output space.
        blank_id: token used as the CTC blank (a token never in transcripts, e.g. ``<|endoftext|>``).
    """
    log_probs = head(audio_hidden).float().log_softmax(-1)  # (N_audio, V)
    rows = torch.split(log_probs, audio_lengths.tolist())  # B x (T_b, V)
    padded = torch.nn.utils.rnn.pad_sequence(list(rows))  # (T_max, B, V)
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)  # (sum S_b,)
    target_lengths = torch.tensor([len(t) for t in targets], device=flat.device)  # (B,)
    return F.ctc_loss(
        padded,
        flat.to(padded.device),
        audio_lengths,
        target_lengths,
        blank=blank_id,
        reduction="sum",
        zero_infinity=True,
    )


def timestamp_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed *non-shifted* cross-entropy over time-bin classes at ``<timestamp>`` slots, and the slot count.

    The forced aligner predicts the time bin of a slot from the slot's own hidden state (label and output
    at the same position, the paper's "causal training"); nothing is shifted, unlike the LM loss.

    Args:
        logits: ``(B, L, C)`` token-classification logits (C time bins of 80 ms).
        labels: ``(B, L)`` time-bin class at slot positions, ``-100`` elsewhere.
    """
    mask = labels != IGNORE_INDEX  # (B, L)
    picked = logits[mask].float()  # (S, C)
    return F.cross_entropy(picked, labels[mask], reduction="sum"), mask.sum()


def slot_ce(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    sigma_bins: float = 0.0,
    hard_weight: float = 0.0,
    centres: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`timestamp_ce` evaluated on the slot positions only (the head never sees the other positions).

    Args:
        hidden: ``(B, L, H)`` last hidden states of the decoder.
        labels: ``(B, L)`` time-bin class at slots, ``-100`` elsewhere (NOT shifted).
        head: dropout + classification head, applied to ``(S, H)``.
        sigma_bins: 0 (default, the paper's loss) for one-hot targets; > 0 for Gaussian soft targets
            over neighbouring bins (:func:`gaussian_bin_targets`).
        hard_weight: 0 (default): every slot counts once. > 0: each slot's CE is weighted by
            :func:`hard_slot_weights` (mean 1 over the slots), so slots the model places far off count more.
        centres: ``(S,)`` float bin positions of the slots in slot order (``recipe.label_subbin``): the Gaussian
            targets are centred there instead of on the class labels. Needs ``sigma_bins`` > 0.

    Returns ``(summed CE, slot count, predicted classes (S,))``.
    """
    mask = labels != IGNORE_INDEX  # (B, L)
    logits = head(hidden[mask]).float()  # (S, C)
    target = labels[mask]  # (S,)
    if centres is not None:
        if sigma_bins <= 0:
            raise ValueError("slot targets centred on exact times need sigma_bins > 0")
        if centres.shape != target.shape or bool(((centres.to(target.device) - target).abs() > 0.501).any()):
            raise ValueError("slot centres do not match the slot labels (each centre must round to its label)")
    if sigma_bins > 0:
        where = target if centres is None else centres.to(logits.device)
        per_slot = -(gaussian_bin_targets(where, logits.shape[-1], sigma_bins) * logits.log_softmax(-1)).sum(-1)
    else:
        per_slot = F.cross_entropy(logits, target, reduction="none")  # (S,)
    if hard_weight > 0:
        per_slot = per_slot * hard_slot_weights(logits, target, hard_weight)
    return per_slot.sum(), mask.sum(), logits.argmax(-1)


def hard_slot_weights(logits: torch.Tensor, target: torch.Tensor, alpha: float, cap_bins: float = 10.0) -> torch.Tensor:
    """``(S,)`` detached weights ``w = 1 + alpha * min(E_p|c - y|, cap_bins)``, rescaled to mean 1.

    ``E_p|c - y|`` is the expected distance in bins between the model's slot distribution ``p`` and the
    labelled bin ``y``. Why: the aligner's errors on long clips come from a few boundaries it misses by
    several bins (a vowel-initial word after a vowel, placed at the next onset), while most slots are
    already within a bin; the plain mean CE spends its gradient on the many easy slots. Weighting by
    the expected error (an online hard-example emphasis, as in focal loss, but measured in time rather
    than probability) moves the gradient towards the boundaries that are placed far off. The cap keeps
    a slot whose word lies outside the audio from dominating, and the rescaling keeps the loss's scale,
    so the learning rate means the same.
    """
    with torch.no_grad():
        probs = logits.float().softmax(-1)  # (S, C)
        bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)  # (C,)
        expected = (probs * (bins[None, :] - target[:, None].float()).abs()).sum(-1)  # (S,)
        weights = 1.0 + alpha * expected.clamp(max=cap_bins)
        return weights / weights.mean().clamp(min=1e-12)


def gaussian_bin_targets(target: torch.Tensor, num_classes: int, sigma_bins: float) -> torch.Tensor:
    """Soft targets over time bins: ``q_c ∝ exp(-(c - y)² / (2σ²))``, normalised over the ``num_classes`` bins.

    Why: plain cross-entropy treats bin 40 and bin 41 as unrelated classes, so each of the hundreds of
    bins is learned from the few slots that land exactly on it and a prediction one bin off is penalised
    like one a second off. A Gaussian over neighbouring bins (an ordinal prior, as in label-distribution
    learning for age or timestamp regression) lets neighbouring bins share evidence. The argmax of ``q`` is
    still ``y``, so decoding is unchanged.

    Args:
        target: ``(S,)`` time-bin class of each slot, or its exact position in bins (float).
        num_classes: number of bins ``C``.
        sigma_bins: standard deviation in bins (> 0).

    Returns ``(S, C)`` float32 rows that sum to 1.
    """
    bins = torch.arange(num_classes, device=target.device, dtype=torch.float32)  # (C,)
    dist = bins[None, :] - target[:, None].float()  # (S, C)
    return torch.softmax(-0.5 * (dist / sigma_bins) ** 2, dim=-1)  # (S, C)
