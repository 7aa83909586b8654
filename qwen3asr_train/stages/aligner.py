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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
        self.norm = training.StepNormaliser()
        self.flops = training.ModelFlops.from_model(model)
        self.peak_tflops = 0.0  # trainer.peak_tflops (set by prepare); 0: from the device name

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.score(self.model.dropout(hidden))

    def forward_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        out = training.backbone_hidden(self.model, batch)
        ce_sum, n_slots, predicted = slot_ce(
            out.last_hidden_state, batch["labels"], self._head, self.recipe.label_sigma_bins
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
        if self.recipe.audio_clock_weight > 0 and self.training:
            sums.update(self._clock(out.last_hidden_state, batch))
        return sums

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
            self.norm.log(self, metrics)
        return self.loss(sums, scale)

    def loss(self, sums: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """This micro-batch's share of the step loss: slot CE (+ CTC) (+ clock), each normalised per step.

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
    evaluator = AlignmentEvaluator(
        processor, sets, cfg.decode.max_batch_seconds, cfg.decode.max_batch_size, unit_report=report
    )
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
        dataset = LongFormDataset(dataset, recipe.concat_max_seconds, recipe.concat_gap_seconds, num_classes)
    collator = AlignerCollator(
        processor,
        num_classes,
        recipe.slot_prob,
        cfg.seed,
        time_shift_seconds=recipe.time_shift_seconds,
        augment=build_augmenter(cfg.data.augment, "aligner", cfg.seed),
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
    return module, datamodule, trainer, processor


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train the aligner and export it (see the module docstring)."""
    module, datamodule, trainer, processor = prepare(cfg)
    training.fit(trainer, module, datamodule=datamodule)  # Preempted (exit 143) / NonFiniteError propagate: no export
    return spine.finish_run(cfg, trainer, module.model, processor, cfg.recipe.export_on_end)
