"""``recipe=aligner``: train Qwen3-ForcedAligner from word times (MFA pseudo-labels or synthetic truth).

Input per utterance: ``<|audio_start|><|audio_pad|>×N<|audio_end|>`` + the word units concatenated without
spaces, with a start and an end ``<timestamp>`` after each *slotted* word (dynamic slot insertion: each
word independently with ``recipe.slot_prob``, fresh every epoch, at least one per sample). Labels are
the 80 ms time bins at the slots. The loss is a **non-shifted** cross-entropy at the slot positions only
(the slot's own hidden state predicts its bin; the decoder stays causal, so each slot sees the audio and
the text before it), summed and divided by the slots of the whole optimizer step (all micro-batches and
ranks), exactly like the SFT token normalisation. The head is evaluated only at slot positions.

Long-form training (``recipe.concat_max_seconds``) adds items made of consecutive utterances of the same
language concatenated (word times offset); inputs longer than the classes can address are refused.

Audio-token clock (``recipe.audio_clock_weight``, training only): the same head, applied to the decoder's
``<|audio_pad|>`` positions, is also trained to predict each audio token's *own* time class (the centre of
the mel frames it summarises). Those outputs are unused at inference, so the exported model is unchanged;
the loss gives the decoder hundreds of absolute-time labels per clip instead of a few slots
(:func:`audio_clock_targets`, docs/aligner.md).

Attention supervision (``recipe.attn_sup_weight``, training only): at every slot, one decoder head's attention
(recomputed for the slot queries from the layer's own projections, q/k norms and rotary) is trained to put its
mass on the audio tokens at the slot's boundary time. Why: the clock loss teaches every audio token its
absolute time, but a slot that does not find its boundary token falls back to the early times most training
slots have; this tells it densely which token to read (:func:`slot_attention_log_probs`, docs/aligner.md).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qwen3asr_train import spine, training
from qwen3asr_train.config.schema import AlignerConfig, EvalHookConfig, RunConfig
from qwen3asr_train.data.aligner import (
    SEGMENT_MS,
    AlignerCollator,
    LongFormDataset,
    UnitPolicyReport,
    max_addressable_seconds,
    slot_class_counts,
    usable_for_alignment,
    usable_samples,
)
from qwen3asr_train.data.datamodule import ASRDataModule, DataPositionTracker, load_train_utterances, row_checks
from qwen3asr_train.data.dataset import UtteranceDataset
from qwen3asr_train.data.manifest import ManifestError, SkipReport, read_manifests
from qwen3asr_train.data.packing import PACKED_KEY, maybe_packed, per_clip
from qwen3asr_train.data.prompts import AUDIO_END, AUDIO_PAD, AUDIO_START, TIMESTAMP
from qwen3asr_train.data.transforms import build_augmenter
from qwen3asr_train.eval.align_eval import AlignmentEvaluator
from qwen3asr_train.eval.hook import PeriodicEvaluation, load_eval_sets
from qwen3asr_train.losses import audio_ctc, slot_ce
from qwen3asr_train.model.builder import AsrModel

log = logging.getLogger(__name__)

UNIT_POLICY_FILE = "unit_policy.json"
"""Per-language counts of the word-unit policy (matched / re-cut / skipped) for training and the hook's sets."""

AUDIO_TOKENS_PER_CHUNK = 13
"""Audio tokens per 1 s encoder chunk (100 mel frames of 10 ms, three stride-2 convolutions): the constant both
processors use to count placeholders. Token ``j`` of a chunk summarises frames ``8j .. 8j+7`` (the 13th only
frames 96-99), so consecutive audio tokens are 80 ms apart inside a chunk and the chunk restarts every 1 s:
audio token ``k`` is *not* time class ``k`` (13 tokens per 12.5 classes)."""

FRAME_MS = 10.0
"""Mel frame hop (160 samples at 16 kHz)."""


def slot_centres(slotted_words: list[list[tuple[str, float, float]]], num_classes: int) -> torch.Tensor:
    """``(S,)`` every slot's exact boundary time in bins, in the order :func:`slot_ce` reads the slots (row by row;
    in a row, each slotted word's start then its end), clipped to the classes (``recipe.label_subbin``).

    Why from ``slotted_words``: the collator keeps the slotted words' times after every crop and shift, the
    same times its class labels were rounded from, so the centres and the labels cannot disagree."""
    per_second = 1000.0 / SEGMENT_MS
    values = [t * per_second for row in slotted_words for _, start, end in row for t in (start, end)]
    return torch.tensor(values, dtype=torch.float32).clamp(0.0, float(num_classes - 1))


def audio_token_centres_ms(index: torch.Tensor) -> torch.Tensor:
    """Time (ms) of the centre of the mel frames that audio token ``index`` (0-based, within its clip) summarises.

    Token ``j`` of chunk ``c`` covers frames ``[8j, min(8j + 8, 100))`` of that 1 s chunk; a frame ``f`` is
    centred at ``10 f`` ms (the feature extractor's centred STFT), so the centre is
    ``1000 c + 10 (8j + min(8j + 8, 100) - 1) / 2`` ms: 35, 115, ..., 915 and 975 ms in every second. A clip's
    last, partial chunk is treated like a full one (its last token may cover fewer frames: < 40 ms off).
    """
    chunk = torch.div(index, AUDIO_TOKENS_PER_CHUNK, rounding_mode="floor")  # (N,)
    j = index - chunk * AUDIO_TOKENS_PER_CHUNK  # (N,)
    first = 8 * j  # (N,) first frame of the token
    last = torch.clamp(first + 8, max=100) - 1  # (N,)
    return chunk.double() * 1000.0 + FRAME_MS * (first + last).double() / 2.0


def audio_clock_targets(
    input_ids: torch.Tensor, audio_token_id: int, segment_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the audio tokens are and their time in 80 ms classes (fractional), for the audio-token clock loss.

    Args:
        input_ids: ``(R, L)`` token ids of a padded (left or right) or packed batch.
        audio_token_id: the ``<|audio_pad|>`` id.
        segment_ids: ``(R, L)`` clip index of each token in a packed batch (-1 on padding), None when unpacked
            (then each row is one clip).

    Returns ``(mask (R, L) bool, centres (N,) float64)``: ``centres[i]`` is the time of the ``i``-th audio token
    in row-major order, in units of 80 ms, counted from the start of its own clip. The count restarts at each
    clip because the decoder positions (and the clip's audio) restart there.
    """
    mask = input_ids == audio_token_id  # (R, L)
    if segment_ids is None:
        clips = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)  # (R, L)
    else:
        clips = segment_ids
    clip_of = clips[mask]  # (N,) clip of each audio token; one clip's tokens are consecutive in row-major order
    order = torch.arange(clip_of.numel(), device=input_ids.device)  # (N,)
    num_clips = int(clip_of.max()) + 1 if clip_of.numel() else 0
    first = torch.full((num_clips,), clip_of.numel(), dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, clip_of, order, reduce="amin")  # (clips,) first audio token of each clip
    index = order - first[clip_of]  # (N,) position of each audio token inside its clip
    return mask, audio_token_centres_ms(index) / SEGMENT_MS


def audio_clock_ce(
    hidden: torch.Tensor, mask: torch.Tensor, centres: torch.Tensor, head: Any, sigma_bins: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the head at the audio tokens against each token's own time.

    Targets are consistent with the slot loss: with ``sigma_bins > 0`` a Gaussian of that width centred at the
    token's fractional class (the centre rarely falls on a class centre: 1 s is 12.5 classes), else one-hot at
    the nearest class (round half up, as :func:`~qwen3asr_train.data.aligner.time_to_class`). Centres past the
    last class clip to it.

    Args:
        hidden: ``(R, L, H)`` decoder output.
        mask: ``(R, L)`` audio-token positions (:func:`audio_clock_targets`).
        centres: ``(N,)`` their times in classes.
        head: dropout + classification head on ``(N, H)``.
        sigma_bins: target width in classes (the slot loss's ``label_sigma_bins``).

    Returns ``(summed CE, summed |argmax - centre| in classes)``.
    """
    logits = head(hidden[mask]).float()  # (N, C)
    num_classes = logits.shape[-1]
    mu = centres.to(logits.device).float().clamp(0, num_classes - 1)  # (N,)
    if sigma_bins > 0:
        bins = torch.arange(num_classes, device=logits.device, dtype=torch.float32)  # (C,)
        target = torch.softmax(-0.5 * ((bins[None, :] - mu[:, None]) / sigma_bins) ** 2, dim=-1)  # (N, C)
        loss = -(target * logits.log_softmax(-1)).sum()
    else:
        loss = torch.nn.functional.cross_entropy(logits, torch.floor(mu + 0.5).long(), reduction="sum")
    error = (logits.argmax(-1).float() - mu).abs().sum()
    return loss, error.detach()


@contextlib.contextmanager
def capture_attention_inputs(attn: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Record the inputs of ``attn`` (a decoder layer's ``self_attn``) on the forwards run inside the block.

    Yields a dict filled with ``hidden_states`` ``(R, L, H)`` (the attention's input, after the layer's input
    norm) and ``position_embeddings`` (the ``(cos, sin)`` the layer's rotary uses). Why a hook and not the
    layer's output attentions: the training forward uses sdpa (no weights), and the slot rows are all that is
    needed, so they are recomputed from exactly the tensors the layer saw (gradients flow through them).
    """
    store: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        store["hidden_states"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        store["position_embeddings"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_layer_output(layer: torch.nn.Module) -> Iterator[dict[str, Any]]:
    """Record the output hidden states ``(R, L, H)`` of ``layer`` (a decoder layer; the residual stream after
    it, before any final norm) on the forwards run inside the block, under key ``output``.

    Why: ``recipe.audio_clock_layer`` trains an earlier layer's output to carry each audio token's time; the
    full ``output_hidden_states`` would keep every layer's states alive for nothing."""
    store: dict[str, Any] = {}

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        store["output"] = output[0] if isinstance(output, tuple) else output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def attention_key_mask(batch: dict, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(S, L)`` bool: the keys the query at ``(rows[s], positions[s])`` attends to in the model's forward.

    Causal, restricted to real tokens (padded batch) or to the query's own clip (packed batch), as the
    attention mask ``training.backbone_hidden`` passes.
    """
    width = batch["input_ids"].shape[1]
    keys = torch.arange(width, device=positions.device)  # (L,)
    causal = keys[None, :] <= positions[:, None]  # (S, L)
    if PACKED_KEY in batch:
        segments = batch["segment_ids"]  # (R, L)
        same = segments[rows] == segments[rows, positions][:, None]  # (S, L)
    else:
        same = batch["attention_mask"][rows].bool()  # (S, L)
    return causal & same


def boundary_attention_targets(
    batch: dict, audio_token_id: int, rows: torch.Tensor, positions: torch.Tensor, sigma_ms: float
) -> torch.Tensor:
    """``(S, L)`` attention targets of the slots: a Gaussian over their clip's audio-token centres.

    Slot ``s``'s boundary time is its label's class centre (``label x 80 ms``; the class is what the slot must
    output). Each audio token of the same clip gets ``exp(-(centre - t)^2 / 2 sigma^2)`` with ``centre`` its own
    time (:func:`audio_token_centres_ms`), normalised over the clip's tokens (a softmax, so a boundary beyond the
    audio still puts its mass on the nearest tokens); every other position gets 0.
    """
    ids = batch["input_ids"]
    segments = batch.get(PACKED_KEY)
    mask, centres = audio_clock_targets(ids, audio_token_id, segments)
    centre_ms = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)  # (R, L)
    centre_ms[mask] = (centres * SEGMENT_MS).float().to(ids.device)
    if segments is None:
        own = mask[rows]  # (S, L) the row is the clip
    else:
        own = mask[rows] & (segments[rows] == segments[rows, positions][:, None])  # (S, L)
    boundary = batch["labels"][rows, positions].float() * SEGMENT_MS  # (S,)
    score = -0.5 * ((centre_ms[rows] - boundary[:, None]) / sigma_ms) ** 2  # (S, L)
    return torch.softmax(score.masked_fill(~own, float("-inf")), dim=-1)


def slot_attention_log_probs(
    attn: torch.nn.Module,
    captured: dict[str, Any],
    rows: torch.Tensor,
    positions: torch.Tensor,
    allowed: torch.Tensor,
    head: int,
) -> torch.Tensor:
    """``(S, L)`` log attention weights of the query at each slot, as the layer's eager attention computes them.

    Recomputed from the layer's captured input (:func:`capture_attention_inputs`) with its own ``q_proj``,
    ``k_proj``, ``q_norm``, ``k_norm`` and rotary (``apply_rotary_pos_emb`` of the attention class's module),
    scaled by ``attn.scaling`` and softmaxed over ``allowed`` keys (:func:`attention_key_mask`); grouped-query
    heads read key head ``h // groups``. Only the slot queries are computed: S x L scores, not L x L.

    Args:
        head: the query head, or -1 for the mean of all heads' attention weights.

    Masked keys get log weight ``finfo.min`` (weight 0), not ``-inf``, so ``0 x log p`` stays 0.
    """
    hidden = captured["hidden_states"]  # (R, L, H)
    cos, sin = captured["position_embeddings"]  # each (R or 1, L, d)
    num_rows, width = hidden.shape[:2]
    cos, sin = cos.expand(num_rows, -1, -1), sin.expand(num_rows, -1, -1)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    d = attn.head_dim
    q = attn.q_norm(attn.q_proj(hidden[rows, positions]).view(rows.shape[0], -1, d))  # (S, nh, d)
    k = attn.k_norm(attn.k_proj(hidden).view(num_rows, width, -1, d))  # (R, L, nkv, d)
    q, _ = rotary(q, q, cos[rows, positions], sin[rows, positions], unsqueeze_dim=1)  # (S, nh, d)
    _, k = rotary(k, k, cos, sin, unsqueeze_dim=2)  # (R, L, nkv, d)
    heads = list(range(q.shape[1])) if head < 0 else [head]
    kv = torch.tensor([h // attn.num_key_value_groups for h in heads], device=k.device)  # (h,)
    q = q[:, heads]  # (S, h, d)
    scores = torch.einsum("shd,slhd->shl", q, k[rows][:, :, kv]) * attn.scaling  # (S, h, L)
    scores = scores.float().masked_fill(~allowed[:, None, :], torch.finfo(torch.float32).min)
    logp = scores.log_softmax(-1)  # (S, h, L)
    if head >= 0:
        return logp[:, 0]
    return torch.logsumexp(logp, dim=1) - torch.log(torch.tensor(float(len(heads))))


class AlignerModule(training.SummedValidation, L.LightningModule):
    """Non-shifted slot cross-entropy, normalised per optimizer step (module docstring)."""

    VAL_COUNT = "n_slots"

    def __init__(
        self, model: AsrModel, recipe: AlignerConfig, total_steps: int, special_ids: Sequence[int] = ()
    ) -> None:
        """``special_ids``: token ids that are not word text (audio markers, slots, pad), dropped from the
        CTC targets; the first is the CTC blank (``<|endoftext|>``)."""
        super().__init__()
        self.model = model
        self.recipe = recipe
        self.total_steps = total_steps
        self.special_ids = list(special_ids)
        if recipe.ctc_weight > 0 and not self.special_ids:
            raise ValueError("recipe.ctc_weight > 0 needs the special token ids (blank first)")
        if recipe.attn_sup_weight > 0:
            text = model.config.text_config
            layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
            if not -layers <= recipe.attn_sup_layer < layers or recipe.attn_sup_head >= heads:
                raise ValueError(
                    f"recipe.attn_sup_layer={recipe.attn_sup_layer} / attn_sup_head={recipe.attn_sup_head}: "
                    f"the decoder has {layers} layers of {heads} heads"
                )
        layers = int(model.config.text_config.num_hidden_layers)
        if not -layers <= recipe.audio_clock_layer < layers:
            raise ValueError(f"recipe.audio_clock_layer={recipe.audio_clock_layer}: the decoder has {layers} layers")
        # None: the clock reads the decoder's output (the last layer, after the final norm), as the slots do.
        self._clock_layer: int | None = recipe.audio_clock_layer % layers
        if self._clock_layer == layers - 1:
            self._clock_layer = None
        self.slot_log_prior: torch.Tensor | None = None  # (C,) set by set_slot_prior when slot_prior_tau > 0
        self.norm = training.StepNormaliser()
        self.flops = training.ModelFlops.from_model(model)
        self.peak_tflops = 0.0  # trainer.peak_tflops (set by prepare); 0: from the device name

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.score(self.model.dropout(hidden))

    def set_slot_prior(self, counts: Any) -> None:
        """Slot labels per class in one training epoch (:func:`slot_class_counts`), for the logit adjustment.

        Add-one smoothing keeps classes no slot reaches finite (their adjustment is the largest)."""
        counts = torch.as_tensor(counts, dtype=torch.float64) + 1.0  # (C,)
        if counts.shape != (int(self.model.config.num_labels),):
            raise ValueError(f"slot prior has {counts.shape} classes, the head {self.model.config.num_labels}")
        self.slot_log_prior = (counts / counts.sum()).log().float()

    def _slot_head(self) -> Any:
        """The head the slot loss uses: logit-adjusted while training with ``recipe.slot_prior_tau > 0``.

        Why: when a slot is unsure, a plain softmax falls back on the times most training slots have (early
        ones); training on ``logits + tau log p`` makes the raw logits (what inference decodes) carry the
        evidence with the prior divided out (logit adjustment, Menon et al. 2021)."""
        tau = self.recipe.slot_prior_tau
        if tau <= 0 or not self.training:
            return self._head
        if self.slot_log_prior is None:
            raise ValueError("recipe.slot_prior_tau > 0 needs the training slot prior (AlignerModule.set_slot_prior)")
        log_prior = self.slot_log_prior

        def adjusted(hidden: torch.Tensor) -> torch.Tensor:
            logits = self._head(hidden)  # (S, C)
            return logits + tau * log_prior.to(device=logits.device, dtype=logits.dtype)

        return adjusted

    def forward_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        supervise = self.recipe.attn_sup_weight > 0 and self.training
        decoder = self.model.model.language_model
        attn = decoder.layers[self.recipe.attn_sup_layer].self_attn if supervise else None
        clock = self.recipe.audio_clock_weight > 0 and self.training
        mid = decoder.layers[self._clock_layer] if clock and self._clock_layer is not None else None
        with (
            capture_attention_inputs(attn) if attn is not None else contextlib.nullcontext({}) as captured,
            capture_layer_output(mid) if mid is not None else contextlib.nullcontext({}) as layer_out,
        ):
            out = training.backbone_hidden(self.model, batch)
        centres = None
        if self.recipe.label_subbin:
            centres = slot_centres(batch["slotted_words"], self.model.config.num_labels)
        ce_sum, n_slots, predicted = slot_ce(
            out.last_hidden_state,
            batch["labels"],
            self._slot_head(),
            self.recipe.label_sigma_bins,
            self.recipe.slot_hard_weight if self.training else 0.0,
            centres,
        )
        target = batch["labels"][batch["labels"] != -100]
        sums = {
            "ce_sum": ce_sum,
            "n_slots": n_slots,
            "exact": (predicted == target).sum(),
            "abs_bins": (predicted - target).abs().sum(),
        }
        if self.recipe.ctc_weight > 0 and self.training:
            sums["ctc_sum"] = self._ctc(out.audio_hidden_states, batch)
        if clock:
            hidden = out.last_hidden_state if mid is None else decoder.norm(layer_out["output"])
            sums.update(self._clock(hidden, batch))
        if attn is not None:
            sums["attn_sum"] = self._attention_ce(attn, captured, batch)
        return sums

    def _attention_ce(self, attn: torch.nn.Module, captured: dict[str, Any], batch: dict) -> torch.Tensor:
        """Summed cross-entropy of the supervised head's slot attention against the boundary targets."""
        if self.model.is_activation_checkpointing:
            raise ValueError(
                "recipe.attn_sup_weight > 0 recomputes attention from the layer inputs a forward hook records; "
                "with model.gradient_checkpointing those inputs carry no gradient: turn one of them off"
            )
        rows, positions = (batch["labels"] != -100).nonzero(as_tuple=True)  # (S,) each
        allowed = attention_key_mask(batch, rows, positions)  # (S, L)
        logp = slot_attention_log_probs(attn, captured, rows, positions, allowed, self.recipe.attn_sup_head)
        target = boundary_attention_targets(
            batch, int(self.model.config.audio_token_id), rows, positions, self.recipe.attn_sup_sigma_ms
        )  # (S, L)
        return -torch.where(target > 0, target * logp, torch.zeros_like(logp)).sum()

    def _clock(self, hidden: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Summed audio-token clock CE (module docstring), its token count and summed |error| in classes.

        ``recipe.audio_clock_fraction < 1`` labels a random subset of the audio tokens (fresh per step, seeded
        by the global step so a resumed run repeats it) to bound the head's cost on very long inputs.
        """
        mask, centres = audio_clock_targets(
            batch["input_ids"], int(self.model.config.audio_token_id), batch.get(PACKED_KEY)
        )
        fraction = self.recipe.audio_clock_fraction
        if fraction < 1.0:
            step = int(self.trainer.global_step) if self._trainer is not None else 0
            gen = torch.Generator().manual_seed(step)
            keep = torch.rand(centres.shape[0], generator=gen) < fraction  # (N,)
            flat = mask.flatten().clone()
            flat[flat.nonzero().squeeze(-1)[~keep.to(flat.device)]] = False
            mask, centres = flat.view_as(mask), centres[keep]
        ce, error = audio_clock_ce(hidden, mask, centres, self._head, self.recipe.label_sigma_bins)
        return {"clock_sum": ce, "clock_n": mask.sum(), "clock_abs_bins": error}

    def _ctc(self, audio_hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """Summed auxiliary CTC of each row's word tokens on its projected audio states.

        Why: from scratch, the decoder can only point a slot at its word's frames once the audio states
        say which word is where; CTC through the (transposed) input embeddings teaches the encoder exactly
        that, in the space the decoder compares against. It uses no extra parameters, so the exported
        aligner is unchanged; training only.
        """
        clips = per_clip(batch, batch["input_ids"])  # real tokens of each clip, in feature order (packed or not)
        audio_lengths = torch.stack([(ids == self.model.config.audio_token_id).sum() for ids in clips])  # (B,)
        special = torch.tensor(self.special_ids, device=batch["input_ids"].device)  # (K,)
        targets = [ids[~torch.isin(ids, special)] for ids in clips]
        embeddings = self.model.model.get_input_embeddings().weight  # (V, H)
        return audio_ctc(audio_hidden, audio_lengths, targets, lambda h: h @ embeddings.T, self.special_ids[0])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        scale = self.norm.observe(self, batch)
        sums = self.forward_sums(batch)
        self.norm.add(
            ce=sums["ce_sum"].detach(),
            slots=sums["n_slots"],
            exact=sums["exact"],
            abs_bins=sums["abs_bins"],
            ctc=sums.get("ctc_sum", torch.zeros(())).detach(),
            clock=sums.get("clock_sum", torch.zeros(())).detach(),
            clock_n=sums.get("clock_n", torch.zeros(())),
            clock_abs=sums.get("clock_abs_bins", torch.zeros(())),
            attn=sums.get("attn_sum", torch.zeros(())).detach(),
            audio=batch["audio_seconds"],
            seq=batch["attention_mask"].numel(),
            real=batch["num_real_tokens"],
            skipped=batch["skipped_audio"],
            model_flops=self.flops.of_batch(batch),
        )
        if self.norm.window_done(batch, self.trainer):
            t, elapsed = self.norm.totals(self)
            n = max(t["slots"], 1.0)
            metrics = {
                "train/loss": t["ce"] / n,
                "train/slot_accuracy": t["exact"] / n,
                "train/slot_error_ms": t["abs_bins"] / n * SEGMENT_MS,
                "train/slots": t["slots"],
                **training.throughput_metrics(t, elapsed, self.trainer, self.peak_tflops),
                **({"train/ctc_loss": t["ctc"] / n} if self.recipe.ctc_weight > 0 else {}),
            }
            if self.recipe.audio_clock_weight > 0:
                m = max(t["clock_n"], 1.0)
                metrics["train/clock_loss"] = t["clock"] / m
                metrics["train/clock_error_ms"] = t["clock_abs"] / m * SEGMENT_MS
            if self.recipe.attn_sup_weight > 0:
                metrics["train/attn_loss"] = t["attn"] / n
            self.norm.log(self, metrics)
        return self.loss(sums, scale)

    def loss(self, sums: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """This micro-batch's share of the step loss: slot CE (+ CTC) (+ clock) (+ attention), each normalised per step.

        The clock term is ``w x`` its mean CE per audio token, weighted like this micro-batch's slots, so over a
        step the loss is ``mean slot CE + w x mean clock CE`` however many audio tokens a slot comes with.
        Without the clock (``w = 0``) the loss is the slot loss, bit for bit.
        """
        loss = sums["ce_sum"] * scale
        if "ctc_sum" in sums:
            loss = loss + self.recipe.ctc_weight * sums["ctc_sum"] * scale
        if "clock_sum" in sums:
            mean = sums["clock_sum"] / sums["clock_n"].clamp(min=1)
            loss = loss + self.recipe.audio_clock_weight * mean * sums["n_slots"] * scale
        if "attn_sum" in sums:
            loss = loss + self.recipe.attn_sup_weight * sums["attn_sum"] * scale
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return training.build_optimizer(self, self.recipe.optim, self.total_steps)


def build_aligner_hook(
    cfg: EvalHookConfig,
    data_cfg: Any,
    processor: Any,
    run_dir: Path,
    units: str,
    report: UnitPolicyReport | None = None,
) -> PeriodicEvaluation | None:
    """The evaluation hook computing AAS on ``evaluation.sets`` (None when no sets are configured).

    ``units``: the word-unit policy (``recipe.on_unit_mismatch``); its per-language counts go to ``report``."""
    if not cfg.sets:
        return None
    report = report if report is not None else UnitPolicyReport()
    sets = load_eval_sets(cfg.sets, row_checks(data_cfg), data_cfg.on_bad_row, cfg.max_utterances)
    for name, samples in sets.items():
        sets[name] = usable_samples(samples, data_cfg.on_bad_row, f"eval:{name}", units=units, report=report)
    evaluator = AlignmentEvaluator.from_decode_config(processor, sets, cfg.decode, unit_report=report)
    return PeriodicEvaluation(evaluator, cfg.every_n_steps, cfg.at_end, run_dir, cfg.monitor, cfg.monitor_mode)


def prepare(
    cfg: RunConfig, extra_callbacks: list[L.Callback] = ()
) -> tuple[AlignerModule, ASRDataModule, L.Trainer, Any]:
    """Model, data and Trainer for an aligner run."""
    recipe: AlignerConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    resume = spine.start_run(cfg, recipe.resume_from)
    rejects = SkipReport()
    units = UnitPolicyReport()
    train, hf = load_train_utterances(cfg.data, rejects)
    policy, unit_policy = cfg.data.on_bad_row, recipe.on_unit_mismatch
    train = usable_for_alignment(train, policy, "train", rejects, units=unit_policy, report=units)
    checks = row_checks(cfg.data)
    valid = read_manifests(cfg.data.valid, checks, cfg.data.on_bad_row, rejects) if cfg.data.valid else []
    valid = usable_for_alignment(valid, policy, "valid", rejects, units=unit_policy, report=units) if valid else []
    if not train:
        raise ManifestError(f"{cfg.data.train}: no training rows left for alignment", "empty_manifest")
    plan = spine.run_plan(
        cfg,
        {"train": train},
        aligner={"concat_max_seconds": recipe.concat_max_seconds, "concat_gap_seconds": recipe.concat_gap_seconds},
    )
    training.check_resume_plan(resume, plan, cfg.trainer.resume_allow_changes)
    model, processor = spine.build_run_model(cfg, [u.text for u in train])
    num_classes = int(model.config.num_labels)
    limit = max_addressable_seconds(num_classes)
    too_long = [u for u in train if u.duration > limit]
    if too_long:
        raise ManifestError(
            f"{too_long[0].source}: {too_long[0].duration:.1f} s exceeds the {limit:g} s that "
            f"{num_classes} time bins of 80 ms address ({len(too_long)} such utterances)",
            "too_long",
        )
    dataset = UtteranceDataset(train, cfg.data.on_bad_row, hf, cfg.data.hf_train.audio_column)
    dataset.rejects_path = run_dir / spine.REJECTS_FILE
    if recipe.concat_max_seconds > 0:
        if recipe.concat_max_seconds > limit:
            raise ValueError(
                f"recipe.concat_max_seconds={recipe.concat_max_seconds} exceeds the {limit:g} s "
                f"that {num_classes} classes address"
            )
        dataset = LongFormDataset(
            dataset,
            recipe.concat_max_seconds,
            recipe.concat_gap_seconds,
            num_classes,
            recipe.concat_fraction,
            window_seconds=recipe.span_window_seconds,
        )
    collator = AlignerCollator(
        processor,
        num_classes,
        recipe.slot_prob,
        cfg.seed,
        time_shift_seconds=recipe.time_shift_seconds,
        augment=build_augmenter(cfg.data.augment, "aligner", cfg.seed),
        span_prob=recipe.span_prob,
        span_lead_seconds=recipe.span_lead_seconds,
        span_window_seconds=recipe.span_window_seconds,
        span_late_prob=recipe.span_late_prob,
    )
    full = AlignerCollator(processor, num_classes, 1.0, cfg.seed)
    collator, full = maybe_packed(collator, cfg.data), maybe_packed(full, cfg.data)
    datamodule = ASRDataModule(
        cfg.data,
        dataset,
        collator,
        cfg.trainer.accumulate_grad_batches,
        cfg.seed,
        UtteranceDataset(valid, cfg.data.on_bad_row) if valid else None,
        full,
    )
    callbacks = [DataPositionTracker(), *extra_callbacks]
    hook = build_aligner_hook(cfg.evaluation, cfg.data, processor, run_dir, unit_policy, units)
    spine.write_rejects(rejects, run_dir)
    units.write(run_dir / UNIT_POLICY_FILE)  # every rank writes the same counts
    if hook is not None:
        callbacks.append(hook)
    trainer = training.build_trainer(cfg, model, callbacks, validation=bool(valid), resume_from=resume, plan=plan)
    per_rank_micro = -(-datamodule.micro_batches_per_epoch() // max(trainer.world_size, 1))
    tok = processor.tokenizer
    special = [tok.pad_token_id] + tok.convert_tokens_to_ids([AUDIO_START, AUDIO_PAD, AUDIO_END, TIMESTAMP])
    module = AlignerModule(model, recipe, spine.total_optimizer_steps(cfg, per_rank_micro), special)
    module.peak_tflops = cfg.trainer.peak_tflops
    if recipe.slot_prior_tau > 0:
        counts = slot_class_counts(dataset, num_classes)
        module.set_slot_prior(counts)
        log.info(
            "slot prior for logit adjustment: %d slots per epoch, %d classes without any",
            counts.sum(),
            (counts == 0).sum(),
        )
    return module, datamodule, trainer, processor


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train the aligner and export it (see the module docstring)."""
    module, datamodule, trainer, processor = prepare(cfg)
    training.fit(trainer, module, datamodule=datamodule)  # Preempted (exit 143) / NonFiniteError propagate: no export
    return spine.finish_run(cfg, trainer, module.model, processor, cfg.recipe.export_on_end)
