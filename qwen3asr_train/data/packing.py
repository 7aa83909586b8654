"""Padding-free packing: several utterances per row, each attending only to itself.

``pack_batch`` turns an already collated, padded micro-batch (SFT or aligner) into packed rows::

    input_ids             (R, P)      long   the real tokens of the rows placed in it, one after the other,
                                             then padding up to the longest packed row
    attention_mask        (R, P)      long   1 on real tokens (statistics only: the model gets the mask
                                             built from segment_ids, see training.backbone_hidden)
    labels, ... (B, L) -> (R, P)             every per-token tensor moves with its tokens
    segment_ids           (R, P)      long   clip index of each token (0..B-1, in feature order), -1 on padding
    position_ids          (R, P)      long   0, 1, 2, ... restarting at each clip (and at the padding tail)
    cu_seq_lens           (S+1,)      int32  boundaries of every segment (clips and padding tails) in the
                                             flattened R×P token stream (flash-attention varlen)
    max_seq_len           int                longest such segment
    input_features        (B, 128, T)        reordered so clip k of the row-major token order is feature row k
    input_features_mask   (B, T)             reordered the same way
    per-clip lists (``ids``, ``languages``, ``slotted_words``: any list of length B) reordered the same way

Why this is exact: the decoder is a causal transformer with 1-D rotary positions (Qwen3), so a token's
hidden state depends only on the tokens before it in its own utterance and on their positions relative to
it. Giving each utterance positions from 0 (what right padding gives it) and an attention mask that is
block-diagonal and causal (or flash-attention's varlen kernel with the same boundaries) reproduces the
unpacked computation; tests/test_packing.py checks loss and gradients against the padded batch. The audio
encoder is untouched: it takes a batch of clips and returns their audio tokens concatenated in clip order,
and the model scatters them into the ``<|audio_pad|>`` positions in row-major order, so the features only
need the order in which the clips appear in the packed rows. Packing changes no label, so the window's
token count (the loss normaliser) is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

PACKED_KEY = "segment_ids"
"""The key whose presence marks a packed batch."""


def plan_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into rows of at most ``max_tokens`` tokens (first-fit decreasing).

    ``max_tokens <= 0``: everything in one row (no padding at all). A sequence longer than the budget gets a
    row of its own. Within a row the sequences keep their original order; rows are ordered by their first
    sequence, so the plan is deterministic.
    """
    if not lengths:
        raise ValueError("nothing to pack: the batch has no rows")
    if max_tokens <= 0:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_tokens - lengths[i])
    return sorted((sorted(row) for row in rows), key=lambda row: row[0])


def _fill_value(key: str, original: torch.Tensor, mask: torch.Tensor, fills: Mapping[str, int]) -> int:
    """Padding value of a per-token tensor: the configured one, else what the padded batch used, else 0."""
    if key in fills:
        return int(fills[key])
    padded = original[~mask]
    return int(padded[0]) if padded.numel() else 0


def pack_batch(batch: Mapping[str, Any], max_tokens: int = 0, fills: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The packed form of a padded micro-batch (see the module docstring for the schema).

    Args:
        batch: a collated batch with ``input_ids``, ``attention_mask`` (1 on real tokens, contiguous per row:
            left or right padding), ``input_features``, ``input_features_mask``; every other tensor of shape
            ``(B, L)`` is treated as per-token and packed the same way.
        max_tokens: token budget of a packed row (0: one row holding the whole micro-batch).
        fills: padding value per per-token key (default: ``labels`` -100; others keep the value the padded
            batch used, e.g. the pad id for ``input_ids``).
    """
    if PACKED_KEY in batch:
        raise ValueError("the batch is already packed")
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # (B, L) each
    B, L = ids.shape
    fills = {"labels": IGNORE_INDEX, **(fills or {})}
    per_token = [
        k
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and tuple(v.shape) == (B, L) and k != "attention_mask"
    ]
    lengths = mask.sum(-1).tolist()
    for b, n in enumerate(lengths):
        real = mask[b].nonzero().flatten()
        if n and int(real[-1] - real[0]) + 1 != n:
            raise ValueError(f"row {b}: its real tokens are not contiguous (the attention mask has holes)")
    rows = plan_rows(lengths, max_tokens)
    order = [i for row in rows for i in row]  # clip k of the row-major token order is original row order[k]
    width = max(sum(lengths[i] for i in row) for row in rows)
    out: dict[str, Any] = dict(batch)
    for key in per_token:
        fill = _fill_value(key, batch[key], mask, fills)
        out[key] = torch.full((len(rows), width), fill, dtype=batch[key].dtype)  # (R, P)
    attention = torch.zeros((len(rows), width), dtype=batch["attention_mask"].dtype)  # (R, P)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, P)
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # (R, P)
    bounds = [0]
    clip = 0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            for key in per_token:
                out[key][r, start : start + n] = batch[key][i][mask[i]]
            attention[r, start : start + n] = 1
            segments[r, start : start + n] = clip
            positions[r, start : start + n] = torch.arange(n)
            bounds.append(bounds[-1] + n)
            start += n
            clip += 1
        if start < width:  # the padding tail: a segment of its own, attending only to itself
            positions[r, start:] = torch.arange(width - start)
            bounds.append(bounds[-1] + width - start)
    cu = torch.tensor(bounds, dtype=torch.int32)  # (S+1,)
    index = torch.tensor(order, dtype=torch.long)  # (B,)
    out.update(
        attention_mask=attention,
        segment_ids=segments,
        position_ids=positions,
        cu_seq_lens=cu,
        max_seq_len=int((cu[1:] - cu[:-1]).max()),
        input_features=batch["input_features"].index_select(0, index),
        input_features_mask=batch["input_features_mask"].index_select(0, index),
    )
    for key, value in batch.items():
        if isinstance(value, list) and len(value) == B:
            out[key] = [value[i] for i in order]
    return out


class PackingCollator:
    """Wraps a micro-batch collator (``(samples, epoch) -> batch``) so its batches come out packed.

    Why a wrapper: the collators keep building the padded batch they are tested for (prompt layout,
    labels, slot placement), and packing is one reversible rearrangement on top, the same for SFT and the
    aligner; the window collator sums ``num_target_tokens``, which packing does not change.
    """

    def __init__(self, collator: Callable[..., dict], max_tokens: int = 0) -> None:
        self.collator = collator
        self.max_tokens = max_tokens

    def __call__(self, samples: Sequence[Any], epoch: int = 0) -> dict:
        return pack_batch(self.collator(samples, epoch), self.max_tokens)


def maybe_packed(collator: Callable[..., dict], data_cfg: Any) -> Callable[..., dict]:
    """``collator`` wrapped in :class:`PackingCollator` when ``data.packing`` is on, else unchanged."""
    if not getattr(data_cfg, "packing", False):
        return collator
    log.info("packing: utterances share rows (data.packing_max_tokens=%s)", data_cfg.packing_max_tokens)
    return PackingCollator(collator, data_cfg.packing_max_tokens)


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(R, 1, P, P)`` bool mask, True where query ``i`` may attend key ``j``: same segment and ``j <= i``.

    Padding (segment -1) forms its own block, so no query row is empty (an all-False row would give NaN).
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, P, P)
    width = segment_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()  # (P, P)
    return (same & causal)[:, None]  # (R, 1, P, P)


def per_clip(batch: Mapping[str, Any], tensor: torch.Tensor) -> list[torch.Tensor]:
    """The real tokens of ``tensor`` (a per-token ``(rows, L)`` tensor of ``batch``) split by clip, in feature
    order: a padded batch's rows, or a packed batch's segments.

    Why: per-utterance quantities (CTC targets, audio-token counts) must not merge the utterances that share
    a packed row, and must follow the order of the audio features (the encoder's output order).
    """
    if PACKED_KEY not in batch:
        mask = batch["attention_mask"].bool()  # (B, L)
        return [row[m] for row, m in zip(tensor, mask, strict=True)]
    segments = batch[PACKED_KEY]  # (R, P)
    real = segments >= 0  # (R, P)
    flat, flat_segments = tensor[real], segments[real]  # (N,) each, grouped by clip in clip order
    counts = torch.bincount(flat_segments, minlength=int(batch["input_features"].shape[0]))  # (B,)
    return list(torch.split(flat, counts.tolist()))
