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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qwen3asr_train.config.schema import AlignerConfig, EvalHookConfig, RunConfig
from qwen3asr_train.data.aligner import (
    SEGMENT_MS,
    AlignerCollator,
    check_word_units,
    concat_utterances,
    max_addressable_seconds,
)
from qwen3asr_train.data.datamodule import ASRDataModule, DataPositionTracker, load_train_utterances, row_checks
from qwen3asr_train.data.dataset import Sample, UtteranceDataset
from qwen3asr_train.data.manifest import ManifestError, SkipReport, Utterance, read_manifests
from qwen3asr_train.data.prompts import AUDIO_END, AUDIO_PAD, AUDIO_START, TIMESTAMP
from qwen3asr_train.eval.align_eval import AlignmentEvaluator
from qwen3asr_train.eval.hook import PeriodicEvaluation, load_eval_sets
from qwen3asr_train.languages import FORCED_ALIGNER_LANGUAGES
from qwen3asr_train.losses import audio_ctc, slot_ce
from qwen3asr_train.model.builder import AsrModel, build_model
from qwen3asr_train.model.export import save_model_init
from qwen3asr_train.stages.sft import (
    MODEL_INIT_DIR,
    REJECTS_FILE,
    export_final,
    run_plan,
    save_run_config,
    total_optimizer_steps,
    write_rejects,
)
from qwen3asr_train.training import (
    StepNormaliser,
    all_reduce_sums,
    build_optimizer,
    build_trainer,
    check_resume_plan,
    fit,
    prepare_run_dir,
)

log = logging.getLogger(__name__)


class LongFormDataset(UtteranceDataset):
    """The utterances themselves, followed by groups of consecutive same-language utterances concatenated.

    A group item is decoded by loading its pieces and joining them with
    :func:`~qwen3asr_train.data.aligner.concat_utterances`; its duration (for batching) is known up front.
    """

    def __init__(self, base: UtteranceDataset, max_seconds: float, gap_seconds: float, num_classes: int) -> None:
        super().__init__(base.utterances, base.on_bad_audio, base.hf_dataset, base.hf_audio_column)
        self.base = base
        self.max_seconds = max_seconds
        self.gap_seconds = gap_seconds
        self.num_classes = num_classes
        self.groups: list[list[int]] = []
        current: list[int] = []
        seconds = 0.0
        for i, utt in enumerate(base.utterances):
            fits = current and utt.language == base.utterances[current[-1]].language
            if fits and seconds + gap_seconds + utt.duration <= max_seconds:
                current.append(i)
                seconds += gap_seconds + utt.duration
                continue
            if len(current) > 1:
                self.groups.append(current)
            current, seconds = [i], utt.duration
        if len(current) > 1:
            self.groups.append(current)
        log.info("long-form training: %d concatenated items of up to %.0f s", len(self.groups), max_seconds)

    def __len__(self) -> int:
        return len(self.base) + len(self.groups)

    def durations(self) -> list[float]:
        joined = [
            sum(self.base.utterances[j].duration for j in g) + self.gap_seconds * (len(g) - 1) for g in self.groups
        ]
        return self.base.durations() + joined

    def load(self, index: int) -> Sample | None:
        if index < len(self.base):
            return self.base.load(index)
        pieces = [self.base.load(j) for j in self.groups[index - len(self.base)]]
        if any(p is None for p in pieces):
            return None
        merged = concat_utterances(pieces, self.max_seconds + 1e-6, self.gap_seconds, num_classes=self.num_classes)
        if len(merged) != 1:
            raise RuntimeError(f"long-form group {index} did not concatenate into one item")
        return Sample(merged[0].utt, merged[0].audio, index)


class AlignerModule(L.LightningModule):
    """Non-shifted slot cross-entropy, normalised per optimizer step (module docstring)."""

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
        self.norm = StepNormaliser()
        self._val: dict[str, float] = {}

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.score(self.model.dropout(hidden))

    def forward_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.model.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
            use_cache=False,
        )
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
        return sums

    def _ctc(self, audio_hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        """Summed auxiliary CTC of each row's word tokens on its projected audio states.

        Why: from scratch, the decoder can only point a slot at its word's frames once the audio states
        say which word is where; CTC through the (transposed) input embeddings teaches the encoder exactly
        that, in the space the decoder compares against. It uses no extra parameters, so the exported
        aligner is unchanged; training only.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()  # (B, L) each
        audio_lengths = (ids == self.model.config.audio_token_id).sum(-1)  # (B,)
        special = torch.tensor(self.special_ids, device=ids.device)  # (K,)
        targets = [row[m & ~torch.isin(row, special)] for row, m in zip(ids, mask, strict=True)]
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
            audio=batch["audio_seconds"],
            seq=batch["attention_mask"].numel(),
            real=batch["attention_mask"].sum(),
            skipped=batch["skipped_audio"],
        )
        if self.norm.window_done(batch, self.trainer):
            t, elapsed = self.norm.totals(self)
            n = max(t["slots"], 1.0)
            self.log_dict(
                {
                    "train/loss": t["ce"] / n,
                    "train/slot_accuracy": t["exact"] / n,
                    "train/slot_error_ms": t["abs_bins"] / n * SEGMENT_MS,
                    "train/slots": t["slots"],
                    "train/tokens_per_s": t["real"] / elapsed,
                    "train/audio_s_per_s": t["audio"] / elapsed,
                    "train/padding_fraction": 1.0 - t["real"] / max(t["seq"], 1.0),
                    "train/skipped_audio": t["skipped"],
                    "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                    **({"train/ctc_loss": t["ctc"] / n} if self.recipe.ctc_weight > 0 else {}),
                },
                on_step=True,
                rank_zero_only=True,
            )
        loss = sums["ce_sum"] * scale
        if "ctc_sum" in sums:
            loss = loss + self.recipe.ctc_weight * sums["ctc_sum"] * scale
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {"ce": 0.0, "slots": 0.0}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        sums = self.forward_sums(batch)
        self._val["ce"] += float(sums["ce_sum"])
        self._val["slots"] += float(sums["n_slots"])

    def on_validation_epoch_end(self) -> None:
        t = all_reduce_sums(self, self._val)
        if t["slots"] > 0:
            self.log("val/loss", t["ce"] / t["slots"], rank_zero_only=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return build_optimizer(self, self.recipe.optim, self.total_steps)


def usable_for_alignment(
    items: Sequence[Utterance], policy: str, what: str, rejects: SkipReport | None = None
) -> list[Utterance]:
    """Utterances with word times matching the aligner's word units; others raise or are skipped (counted,
    and added to ``rejects`` tagged with ``what``)."""
    kept, report = [], SkipReport()
    for utt in items:
        try:
            if utt.language is None:
                raise ManifestError(f"{utt.source}: no-speech rows have no words to align", "no_speech")
            check_word_units(utt)
        except (ManifestError, ValueError) as exc:
            if policy == "error":
                raise ManifestError(str(exc), getattr(exc, "reason", "unit_mismatch")) from None
            report.add(getattr(exc, "reason", "unit_mismatch"), str(exc), utt.source)
            continue
        kept.append(utt)
    report.log(what)
    if rejects is not None:
        rejects.extend(report, what)
    outside = sorted({u.language for u in kept} - set(FORCED_ALIGNER_LANGUAGES) - {None})
    if outside:
        log.warning("languages outside the released aligner's 11: %s (training a new language)", outside)
    return kept


def build_aligner_hook(
    cfg: EvalHookConfig, data_cfg: Any, processor: Any, run_dir: Path, policy: str
) -> PeriodicEvaluation | None:
    """The evaluation hook computing AAS on ``evaluation.sets`` (None when no sets are configured)."""
    if not cfg.sets:
        return None
    sets = load_eval_sets(cfg.sets, row_checks(data_cfg), data_cfg.on_bad_row, cfg.max_utterances)
    for name, samples in sets.items():
        keep = {u.id for u in usable_for_alignment([s.utt for s in samples], policy, f"evaluation set {name}")}
        sets[name] = [s for s in samples if s.utt.id in keep]
    evaluator = AlignmentEvaluator(processor, sets, cfg.decode.max_batch_seconds, cfg.decode.max_batch_size)
    return PeriodicEvaluation(evaluator, cfg.every_n_steps, cfg.at_end, run_dir, cfg.monitor, cfg.monitor_mode)


def prepare(
    cfg: RunConfig, extra_callbacks: list[L.Callback] = ()
) -> tuple[AlignerModule, ASRDataModule, L.Trainer, Any]:
    """Model, data and Trainer for an aligner run."""
    recipe: AlignerConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    resume = prepare_run_dir(cfg, recipe.resume_from)
    L.seed_everything(cfg.seed, workers=True)
    save_run_config(cfg, run_dir)
    rejects = SkipReport()
    train, hf = load_train_utterances(cfg.data, rejects)
    train = usable_for_alignment(train, recipe.on_unit_mismatch, "train", rejects)
    checks = row_checks(cfg.data)
    valid = read_manifests(cfg.data.valid, checks, cfg.data.on_bad_row, rejects) if cfg.data.valid else []
    valid = usable_for_alignment(valid, recipe.on_unit_mismatch, "valid", rejects) if valid else []
    write_rejects(rejects, run_dir)
    plan = run_plan(
        cfg,
        {"train": train},
        aligner={"concat_max_seconds": recipe.concat_max_seconds, "concat_gap_seconds": recipe.concat_gap_seconds},
    )
    check_resume_plan(resume, plan, cfg.trainer.resume_allow_changes)
    model, processor = build_model(cfg.model, texts=[u.text for u in train], seed=cfg.seed)
    num_classes = int(model.config.num_labels)
    limit = max_addressable_seconds(num_classes)
    too_long = [u for u in train if u.duration > limit]
    if too_long:
        raise ManifestError(
            f"{too_long[0].source}: {too_long[0].duration:.1f} s exceeds the {limit:g} s that "
            f"{num_classes} time bins of 80 ms address ({len(too_long)} such utterances)",
            "too_long",
        )
    init_dir = run_dir / MODEL_INIT_DIR
    save_model_init(model, processor, init_dir, from_scratch=cfg.model.source == "tiny")

    dataset = UtteranceDataset(train, cfg.data.on_bad_row, hf, cfg.data.hf_train.audio_column)
    dataset.rejects_path = run_dir / REJECTS_FILE
    if recipe.concat_max_seconds > 0:
        if recipe.concat_max_seconds > limit:
            raise ValueError(
                f"recipe.concat_max_seconds={recipe.concat_max_seconds} exceeds the {limit:g} s "
                f"that {num_classes} classes address"
            )
        dataset = LongFormDataset(dataset, recipe.concat_max_seconds, recipe.concat_gap_seconds, num_classes)
    collator = AlignerCollator(
        processor, num_classes, recipe.slot_prob, cfg.seed, time_shift_seconds=recipe.time_shift_seconds
    )
    full = AlignerCollator(processor, num_classes, 1.0, cfg.seed)
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
    hook = build_aligner_hook(cfg.evaluation, cfg.data, processor, run_dir, recipe.on_unit_mismatch)
    if hook is not None:
        callbacks.append(hook)
    trainer = build_trainer(cfg, model, callbacks, validation=bool(valid), resume_from=resume, plan=plan)
    per_rank_micro = -(-datamodule.micro_batches_per_epoch() // max(trainer.world_size, 1))
    tok = processor.tokenizer
    special = [tok.pad_token_id] + tok.convert_tokens_to_ids([AUDIO_START, AUDIO_PAD, AUDIO_END, TIMESTAMP])
    module = AlignerModule(model, recipe, total_optimizer_steps(cfg, per_rank_micro), special)
    return module, datamodule, trainer, processor


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train the aligner and export it (see the module docstring)."""
    recipe: AlignerConfig = cfg.recipe
    run_dir = Path(cfg.run_dir)
    module, datamodule, trainer, processor = prepare(cfg)
    fit(trainer, module, datamodule=datamodule)  # Preempted (exit 143) / NonFiniteError propagate: no export
    written: dict[str, Any] = {"run_dir": str(run_dir)}
    if recipe.export_on_end and cfg.trainer.strategy in {"auto", "ddp"} and trainer.is_global_zero:
        written["export"] = str(export_final(module.model, processor, trainer, run_dir))
    return written
