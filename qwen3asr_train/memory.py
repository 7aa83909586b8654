"""Training memory per GPU, from activation sizes measured on the real layer widths (``make memory``).

Why measured and not guessed: what autograd keeps for backward depends on details nobody counts right by hand
(fp32 RMSNorm inputs, q/k norms, RoPE intermediates, bf16 and fp32 copies under autocast). So this module

1. builds the real architecture at the published widths (:data:`REAL_SIZES`) with 1 or 2 encoder and decoder
   layers, random weights, on the CPU;
2. runs our training forward (backbone + target-only head and loss) under bf16 autocast on a few inputs and
   counts the bytes of every tensor autograd saves for backward (saved-tensor hooks, deduplicated by storage,
   parameters excluded): :func:`saved_bytes`;
3. solves for the bytes per audio-second, per decoder token and per target token, and per extra encoder or
   decoder layer (differences between the 1- and 2-layer models), and extrapolates to the full layer counts;
4. adds the per-GPU model states of each strategy (:func:`states_bytes`), with parameter counts taken from the
   full model instantiated on the meta device (:func:`parameter_count`).

CPU autocast and the CPU attention kernels are not CUDA's (flash attention saves less), so treat the numbers
as +-30%; a GPU run records the measured peak next to them (docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

AUDIO_TOKEN_ID = 151676
AUDIO_START_ID = 151669
AUDIO_END_ID = 151670
PAD_ID = 151643
VOCAB = 151936
MEL_BINS = 128
FRAMES_PER_SECOND = 100
GIB = 1024**3

REAL_SIZES: dict[str, dict[str, int]] = {
    # published config.json values of Qwen/Qwen3-ASR-0.6B and -1.7B (docs/performance.md lists them)
    "0.6B": dict(
        encoder_layers=18,
        d_model=896,
        encoder_attention_heads=14,
        encoder_ffn_dim=3584,
        output_dim=1024,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "1.7B": dict(
        encoder_layers=24,
        d_model=1024,
        encoder_attention_heads=16,
        encoder_ffn_dim=4096,
        output_dim=2048,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
}
"""Shared by both: 128 mel bins, n_window 50, conv channels 480, vocabulary 151,936, tied embeddings."""


def special_ids(vocab: int) -> dict[str, int]:
    """The real special-token ids, or the last ids of a smaller vocabulary (tests build tiny ones)."""
    if vocab >= VOCAB:
        return {"audio": AUDIO_TOKEN_ID, "start": AUDIO_START_ID, "end": AUDIO_END_ID, "pad": PAD_ID}
    return {"audio": vocab - 1, "start": vocab - 2, "end": vocab - 3, "pad": vocab - 4}


def asr_config(
    size: dict[str, int], encoder_layers: int | None = None, decoder_layers: int | None = None, vocab: int = VOCAB
) -> Any:
    """A transformers-native ``Qwen3ASRConfig`` with the given widths (layer counts overridable)."""
    from transformers import Qwen3ASRConfig

    return Qwen3ASRConfig(
        audio_config={
            "model_type": "qwen3_asr_encoder",
            "num_mel_bins": MEL_BINS,
            "encoder_layers": encoder_layers or size["encoder_layers"],
            "encoder_attention_heads": size["encoder_attention_heads"],
            "encoder_ffn_dim": size["encoder_ffn_dim"],
            "d_model": size["d_model"],
            "output_dim": size["output_dim"],
            "downsample_hidden_size": size.get("downsample_hidden_size", 480),
            "n_window": 50,
            "n_window_infer": 800,
            "max_position_embeddings": 13,
        },
        text_config={
            "model_type": "qwen3",
            "vocab_size": vocab,
            "hidden_size": size["hidden_size"],
            "intermediate_size": size["intermediate_size"],
            "num_hidden_layers": decoder_layers or size["num_hidden_layers"],
            "num_attention_heads": size["num_attention_heads"],
            "num_key_value_heads": size["num_key_value_heads"],
            "head_dim": size["head_dim"],
            "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        audio_token_id=special_ids(vocab)["audio"],
        pad_token_id=special_ids(vocab)["pad"],
        eos_token_id=[special_ids(vocab)["pad"]],
        tie_word_embeddings=True,
    )


def parameter_count(config: Any) -> dict[str, int]:
    """Parameters of the ASR model for ``config``, built on the meta device (no memory); tied weights once."""
    from transformers import Qwen3ASRForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3ASRForConditionalGeneration(config)
    params = list(model.parameters())  # shared (tied) parameters are yielded once
    layers = [m for m in model.modules() if type(m).__name__ in {"Qwen3DecoderLayer", "Qwen3ASRAudioEncoderLayer"}]
    return {
        "total": sum(p.numel() for p in params),
        "largest_layer": max(sum(p.numel() for p in m.parameters()) for m in layers),
        "embedding": model.get_input_embeddings().weight.numel(),
    }


# ------------------------------------------------------------------------------------- measuring
@contextmanager
def saved_tensor_counter(exclude: Iterator[torch.Tensor] | list[torch.Tensor] = ()) -> Iterator[dict[str, int]]:
    """Count the bytes of tensors autograd saves for backward inside the block, once per storage.

    ``exclude``: tensors whose storage is not counted (the parameters: they exist whether or not a graph
    does). Views of one storage (a transpose, a slice) count once, at the storage's size.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    result = {"bytes": 0, "tensors": 0}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" and tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in skip and ptr not in seen and storage.nbytes() > 0:
                seen[ptr] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["tensors"] = len(seen)


def graph_saved_bytes(root: torch.Tensor, exclude: list[torch.Tensor] = ()) -> int:
    """A second way to count the same bytes: walk the autograd graph from ``root`` and add up the storages of
    every ``_saved_*`` tensor attribute of its nodes (and ``saved_tensors`` of custom functions)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    stack, visited = [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                tensors.extend(
                    v for v in (value if isinstance(value, tuple | list) else [value]) if isinstance(v, torch.Tensor)
                )
        if hasattr(node, "saved_tensors"):
            try:
                tensors.extend(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
            except RuntimeError:  # already freed
                pass
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip and storage.nbytes() > 0:
                seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return sum(seen.values())


@dataclass
class Sample:
    """One training clip as the decoder sees it: audio seconds, prompt tokens (besides audio), target tokens."""

    seconds: float
    prompt_tokens: int
    target_tokens: int

    def decoder_tokens(self) -> int:
        from qwen3asr_train.data.audio import audio_tokens_for_frames

        return (
            self.prompt_tokens
            + audio_tokens_for_frames(int(round(self.seconds * FRAMES_PER_SECOND)))
            + self.target_tokens
        )


def make_batch(sample: Sample, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-row training batch for ``sample`` (random mel, random token ids, labels on the targets)."""
    from qwen3asr_train.data.audio import audio_tokens_for_frames

    gen = torch.Generator().manual_seed(seed)
    frames = int(round(sample.seconds * FRAMES_PER_SECOND))
    n_audio = audio_tokens_for_frames(frames)
    padded = -(-frames // FRAMES_PER_SECOND) * FRAMES_PER_SECOND  # the encoder takes whole 1-s chunks
    head = sample.prompt_tokens // 2
    special = special_ids(vocab)
    plain = min(vocab - 4, 150000)  # ids of ordinary text tokens
    ids = torch.cat(
        [
            torch.randint(0, plain, (head,), generator=gen),
            torch.tensor([special["start"]]),
            torch.full((n_audio,), special["audio"]),
            torch.tensor([special["end"]]),
            torch.randint(0, plain, (sample.prompt_tokens - head - 2,), generator=gen),
            torch.randint(0, plain, (sample.target_tokens,), generator=gen),
        ]
    )[None]  # (1, L)
    labels = torch.full_like(ids, -100)
    labels[0, -sample.target_tokens :] = ids[0, -sample.target_tokens :]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "input_features": torch.randn(1, MEL_BINS, padded, generator=gen),
        "input_features_mask": (torch.arange(padded) < frames).long()[None],  # (1, padded)
    }


def enable_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """``none``; ``layers`` (HF gradient checkpointing of encoder and decoder layers); ``full`` (layers plus the
    whole audio encoder, convolution front-end included, as the training configs do)."""
    if mode == "none":
        return
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if mode == "full":
        from qwen3asr_train.model import builder

        wrap = getattr(builder, "checkpoint_audio_tower", None)
        if wrap is None:
            raise RuntimeError("checkpoint mode 'full' needs qwen3asr_train.model.builder.checkpoint_audio_tower")
        wrap(model)


def training_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], ce_chunk_tokens: int) -> torch.Tensor:
    """Our SFT loss forward: backbone, then the head and cross-entropy on the target positions only."""
    from qwen3asr_train.losses import target_token_ce
    from qwen3asr_train.training import backbone_hidden

    out = backbone_hidden(model, batch)
    try:
        loss, _ = target_token_ce(out.last_hidden_state, batch["labels"], model.lm_head, chunk_tokens=ce_chunk_tokens)
    except TypeError:  # a target_token_ce without chunking
        loss, _ = target_token_ce(out.last_hidden_state, batch["labels"], model.lm_head)
    return loss


def saved_bytes(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    autocast: bool = True,
    ce_chunk_tokens: int = 0,
    method: str = "hooks",
) -> int:
    """Bytes autograd keeps for backward after one training forward of ``batch`` (parameters excluded).

    ``method``: ``hooks`` (saved-tensor hooks) or ``graph`` (walking the graph's saved attributes).
    """
    params = list(model.parameters())
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    if method == "hooks":
        with saved_tensor_counter(params) as counted, cast:
            loss = training_forward(model, batch, ce_chunk_tokens)
        del loss
        return counted["bytes"]
    with cast:
        loss = training_forward(model, batch, ce_chunk_tokens)
    return graph_saved_bytes(loss, params)


@dataclass
class ActivationRates:
    """Activation bytes of a micro-batch = per_audio_s x seconds + per_token x decoder tokens + per_target x
    targets (+ a constant per row, ignored), for one model at its full layer counts and one checkpoint mode."""

    per_audio_s: float
    per_token: float
    per_target: float
    encoder_layer_per_audio_s: float
    decoder_layer_per_token: float
    outside_per_audio_s: float
    outside_per_token: float

    def bytes(self, audio_s: float, tokens: float, targets: float) -> float:
        return self.per_audio_s * audio_s + self.per_token * tokens + self.per_target * targets


BASE_SAMPLE = Sample(1.0, 16, 8)
"""The measurement's base clip: 1 s of audio, 16 prompt tokens, 8 target tokens (short: the conv front-end
at real widths costs seconds of CPU per audio-second under bf16 autocast)."""
STEP_SAMPLE = Sample(1.0, 32, 32)
"""What each of the other three measurements adds to the base clip (seconds, prompt tokens, targets)."""


def measure_rates(
    size: dict[str, int],
    checkpointing: str = "none",
    autocast: bool = True,
    ce_chunk_tokens: int = 0,
    vocab: int = VOCAB,
    base: Sample = BASE_SAMPLE,
    step: Sample = STEP_SAMPLE,
    method: str = "hooks",
) -> ActivationRates:
    """Measure on 1-2-layer models of ``size`` and extrapolate to its layer counts.

    Four forwards per model: ``base``, and ``base`` with more audio seconds, more prompt tokens or more target
    tokens (``step``), solve for the three rates; the 2-encoder-layer and 2-decoder-layer models give the
    per-layer rates by difference.
    """
    from transformers import Qwen3ASRForConditionalGeneration

    points = [
        base,
        Sample(base.seconds + step.seconds, base.prompt_tokens, base.target_tokens),
        Sample(base.seconds, base.prompt_tokens + step.prompt_tokens, base.target_tokens),
        Sample(base.seconds, base.prompt_tokens, base.target_tokens + step.target_tokens),
    ]

    def rates(enc: int, dec: int) -> tuple[float, float, float]:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Qwen3ASRForConditionalGeneration(asr_config(size, enc, dec, vocab))
        model.train()
        enable_checkpointing(model, checkpointing)
        b = [saved_bytes(model, make_batch(p, vocab), autocast, ce_chunk_tokens, method) for p in points]
        dt_audio = points[1].decoder_tokens() - points[0].decoder_tokens()  # audio tokens added with the seconds
        per_token = (b[2] - b[0]) / step.prompt_tokens
        per_target = (b[3] - b[0]) / step.target_tokens - per_token  # a target is also a decoder token
        per_audio_s = (b[1] - b[0] - per_token * dt_audio) / step.seconds
        return per_audio_s, per_token, per_target

    a11, t11, g11 = rates(1, 1)
    a21, _, _ = rates(2, 1)
    _, t12, _ = rates(1, 2)
    enc_layer = a21 - a11
    dec_layer = t12 - t11
    n_enc, n_dec = size["encoder_layers"], size["num_hidden_layers"]
    return ActivationRates(
        per_audio_s=a11 + (n_enc - 1) * enc_layer,
        per_token=t11 + (n_dec - 1) * dec_layer,
        per_target=g11,
        encoder_layer_per_audio_s=enc_layer,
        decoder_layer_per_token=dec_layer,
        outside_per_audio_s=a11 - enc_layer,
        outside_per_token=t11 - dec_layer,
    )


def head_chunk_peak_bytes(hidden: int, chunk: int, vocab: int = VOCAB) -> float:
    """Transient memory of one chunk of the chunked head in backward: its bf16 logits, their fp32 copy, the
    fp32 log-softmax saved by cross-entropy and the fp32 gradient of the logits (4 tensors of chunk x vocab,
    one of them bf16); 0 when the head is not chunked (its activations are then in ``per_target``)."""
    return float(chunk * vocab * (2 + 4 + 4 + 4)) if chunk > 0 else 0.0


# ------------------------------------------------------------------------------------------ states
STRATEGIES = ("1 GPU", "DDP", "FSDP full shard", "ZeRO-2", "ZeRO-3")


@dataclass
class StateOptions:
    """Assumptions behind :func:`states_bytes` (the defaults are our configs')."""

    gpus: int = 8
    ddp_bucket_view: bool = True
    """DDP with ``gradient_as_bucket_view`` (no second fp32 gradient copy)."""
    zero_bucket_elements: float = 2e8
    """Lightning's DeepSpeed reduce/all-gather bucket sizes (elements)."""
    zero3_live_elements: float = 1e9
    """DeepSpeed ``stage3_max_live_parameters`` (Lightning's default): the most gathered bf16 weights at once."""


def states_bytes(strategy: str, params: dict[str, int], opts: StateOptions) -> float:
    """Weights, gradients and AdamW state per GPU under bf16-mixed (fp32 master weights).

    - 1 GPU: fp32 weights 4 + fp32 gradients 4 + AdamW m, v 8 = 16 B/param, + 2 B/param for the bf16 copies
      autocast caches during forward/backward.
    - DDP: the same per GPU, + 4 B/param for DDP's gradient buckets unless ``gradient_as_bucket_view``.
    - FSDP full shard over N (Lightning's bf16-mixed: fp32 flat shards, bf16 gathered params, bf16 reduce):
      16/N B/param, + the root unit (embeddings, which stay gathered) and two gathered layers (current and
      prefetched), each 2 B/param for the bf16 weights and 4 B/param for their unsharded gradients.
    - ZeRO-2 over N: bf16 weights 2 B/param, + fp32 master/m/v 12/N, + bf16 gradient partition 2/N, + the
      reduce and all-gather buckets.
    - ZeRO-3 over N: (2 + 2 + 12)/N B/param, + up to ``zero3_live_elements`` gathered bf16 weights (at most
      the whole model) + the buckets.
    """
    p, n = float(params["total"]), float(opts.gpus)
    buckets = 2 * opts.zero_bucket_elements * 2  # reduce + all-gather buckets, bf16
    if strategy == "1 GPU":
        return 18 * p
    if strategy == "DDP":
        return 18 * p + (0 if opts.ddp_bucket_view else 4 * p)
    if strategy == "FSDP full shard":
        gathered = params["embedding"] + 2 * params["largest_layer"]
        return 16 * p / n + 6 * gathered
    if strategy == "ZeRO-2":
        return 2 * p + 12 * p / n + 2 * p / n + buckets
    if strategy == "ZeRO-3":
        return 16 * p / n + 2 * min(p, opts.zero3_live_elements) + buckets
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


# ------------------------------------------------------------------------------------------- table
@dataclass
class MicroBatch:
    """A micro-batch by its content: audio seconds, decoder tokens (audio + prompt + target), target tokens."""

    audio_s: float = 120.0
    tokens: float = 2200.0
    targets: float = 450.0


@dataclass
class Estimate:
    """One row of the memory table (bytes).

    ``activations``: without checkpointing, saved bytes + the head's chunk transient. ``activations_ckpt``:
    with it, the larger of (saved bytes + the larger of the head's chunk transient and one decoder layer
    recomputed) and the audio encoder's recompute at the end of backward (its conv maps and one layer, for the
    whole micro-batch's audio, when the decoder's activations are already freed)."""

    model: str
    strategy: str
    gpus: int
    parameters: int
    states: float
    activations: float
    activations_ckpt: float
    head_peak: float
    notes: list[str] = field(default_factory=list)

    def total(self, checkpointing: bool) -> float:
        """Peak per GPU: states + the activation peak (both activation fields already include the transients)."""
        return self.states + (self.activations_ckpt if checkpointing else self.activations)


def estimate(
    name: str,
    rates_none: ActivationRates,
    rates_ckpt: ActivationRates,
    batch: MicroBatch,
    opts: StateOptions,
    ce_chunk_tokens: int,
    strategies: tuple[str, ...] = STRATEGIES,
) -> list[Estimate]:
    """The table rows of one model size."""
    size = REAL_SIZES[name]
    params = parameter_count(asr_config(size))
    head_peak = head_chunk_peak_bytes(size["hidden_size"], ce_chunk_tokens)
    rows = []
    for strategy in strategies:
        gpus = 1 if strategy == "1 GPU" else opts.gpus
        rows.append(
            Estimate(
                model=name,
                strategy=strategy,
                gpus=gpus,
                parameters=params["total"],
                states=states_bytes(strategy, params, opts),
                activations=rates_none.bytes(batch.audio_s, batch.tokens, batch.targets) + head_peak,
                activations_ckpt=max(
                    rates_ckpt.bytes(batch.audio_s, batch.tokens, batch.targets)
                    + max(head_peak, rates_none.decoder_layer_per_token * batch.tokens),
                    (rates_none.outside_per_audio_s + rates_none.encoder_layer_per_audio_s) * batch.audio_s,
                ),
                head_peak=head_peak,
            )
        )
    return rows


def markdown_table(rows: list[Estimate]) -> str:
    """GiB per GPU, with and without gradient checkpointing."""
    lines = [
        "| model | strategy | GPUs | params | states GiB | activations GiB (no ckpt) | total GiB (no ckpt) | "
        "activations GiB (ckpt) | total GiB (ckpt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.strategy} | {r.gpus} | {r.parameters / 1e9:.3f} B | {r.states / GIB:.1f} | "
            f"{r.activations / GIB:.1f} | {r.total(False) / GIB:.1f} | {r.activations_ckpt / GIB:.2f} | "
            f"**{r.total(True) / GIB:.1f}** |"
        )
    return "\n".join(lines)


def rates_table(rates: dict[str, ActivationRates]) -> str:
    """The measured per-unit sizes (KB / MB), one row per model and checkpoint mode."""
    lines = [
        "| model, mode | decoder layer / token | encoder layer / audio-s | outside layers / token | "
        "outside layers / audio-s | head + CE / target | total / audio-s | total / token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rates.items():
        lines.append(
            f"| {key} | {r.decoder_layer_per_token / 1e3:.1f} KB | {r.encoder_layer_per_audio_s / 1e6:.2f} MB | "
            f"{r.outside_per_token / 1e3:.1f} KB | {r.outside_per_audio_s / 1e6:.2f} MB | "
            f"{r.per_target / 1e3:.1f} KB | {r.per_audio_s / 1e6:.1f} MB | {r.per_token / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def fits(rows: list[Estimate], budget_gib: float, checkpointing: bool = True) -> dict[tuple[str, str], bool]:
    """Which rows fit ``budget_gib`` per GPU."""
    return {(r.model, r.strategy): r.total(checkpointing) / GIB <= budget_gib for r in rows}


def largest_fitting_seconds(row: Estimate, batch: MicroBatch, budget_gib: float, checkpointing: bool = True) -> float:
    """Audio seconds of the largest micro-batch with ``batch``'s token mix per second that fits ``budget_gib``
    (0 when the states alone do not fit)."""
    activations = row.activations_ckpt if checkpointing else row.activations
    per_second = activations / batch.audio_s
    room = budget_gib * GIB - row.states
    return max(0.0, room / per_second)
