"""Run the vendored official SFT recipe unmodified, with a passive clock (compat venv only).

Runs in ``.venv-compat`` (qwen-asr 0.0.6, transformers 4.57.6); it imports nothing from ``qwen3asr_train``.

What it does, in order:

1. reads ``benchmarks/upstream/qwen3_asr_sft.py``, strips the vendoring header and checks that the rest has
   the sha256 of upstream's file at commit 7c6daf7 (an edited copy is refused);
2. writes those exact upstream bytes to a temporary ``qwen3_asr_sft.py`` and runs it as ``__main__`` with the
   given arguments (``runpy``: the same as ``python qwen3_asr_sft.py ...``);
3. observes, without changing behaviour, ``Trainer.training_step`` (the statistics of each micro-batch the
   Trainer trains on) and ``CallbackHandler.on_step_end`` (the end of each optimizer step), and writes them
   as JSON in the format of :mod:`benchmarks.step_clock`.

Usage: ``python official_launcher.py --clock-out F.json -- <arguments of qwen3_asr_sft.py>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import runpy
import sys
import tempfile
import time
from pathlib import Path

VENDORED = Path(__file__).resolve().parent / "upstream" / "qwen3_asr_sft.py"
MARKER = b"# ---- upstream file follows, byte for byte ----\n"
UPSTREAM_SHA256 = "6f3e5cc530d9da9ff405144fc94a5c4790018eaf956dbc623634818160418976"
"""sha256 of ``finetuning/qwen3_asr_sft.py`` at QwenLM/Qwen3-ASR commit 7c6daf7."""


class VendoredFileChanged(RuntimeError):
    """The vendored official script is not byte-identical to upstream's."""


def upstream_bytes(path: Path = VENDORED) -> bytes:
    """The upstream script's bytes from the vendored file, after checking their sha256."""
    raw = path.read_bytes()
    if MARKER not in raw:
        raise VendoredFileChanged(f"{path}: the vendoring marker line is missing")
    body = raw.split(MARKER, 1)[1]
    digest = hashlib.sha256(body).hexdigest()
    if digest != UPSTREAM_SHA256:
        raise VendoredFileChanged(
            f"{path}: sha256 {digest} != upstream's {UPSTREAM_SHA256}; the official recipe must run unmodified "
            f"(restore it with: git -C <Qwen3-ASR clone> show 7c6daf7:finetuning/qwen3_asr_sft.py)"
        )
    return body


def _install_clock(record: dict) -> None:
    """Wrap two transformers methods so each call is also timed/counted; their results are returned as is."""
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    pending: dict[str, float] = {}
    training_step = Trainer.training_step
    on_step_end = CallbackHandler.on_step_end
    on_train_begin = CallbackHandler.on_train_begin
    on_train_end = CallbackHandler.on_train_end

    def timed_training_step(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        frames = inputs.get("feature_attention_mask")
        stats = {
            "audio_s": float(frames.sum()) / 100.0 if frames is not None else 0.0,
            "real_tokens": float(mask.sum()) if mask is not None else float(ids.numel()),
            "positions": float(ids.numel()),
            "rows": float(ids.shape[0]),
            "trained_label_tokens": float((inputs["labels"] != -100).sum()) if "labels" in inputs else 0.0,
            "micro_batches": 1.0,
            "head_rows": float(ids.numel()),  # its model computes 151,936-way logits at every position
        }
        for key, value in stats.items():
            pending[key] = pending.get(key, 0.0) + value
        return training_step(self, model, inputs, *args, **kwargs)

    def timed_on_step_end(self, args, state, control):
        record["steps"].append({"t": time.perf_counter(), **pending})
        pending.clear()
        if record.get("clock_out"):  # after every step, so a run stopped early still has its steps
            Path(record["clock_out"]).write_text(json.dumps(record) + "\n")
        return on_step_end(self, args, state, control)

    def timed_on_train_begin(self, args, state, control):
        record["t_begin"] = time.perf_counter()
        return on_train_begin(self, args, state, control)

    def timed_on_train_end(self, args, state, control):
        record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        record["torch_threads"] = torch.get_num_threads()
        record["model_dtype"] = str(getattr(getattr(self, "model", None), "dtype", ""))
        return on_train_end(self, args, state, control)

    Trainer.training_step = timed_training_step
    CallbackHandler.on_step_end = timed_on_step_end
    CallbackHandler.on_train_begin = timed_on_train_begin
    CallbackHandler.on_train_end = timed_on_train_end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clock-out", required=True, type=Path, help="JSON file for the step records")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="-- then the official script's arguments")
    args = parser.parse_args(argv)
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    body = upstream_bytes()
    args.clock_out.parent.mkdir(parents=True, exist_ok=True)
    record: dict = {
        "side": "official",
        "steps": [],
        "upstream_sha256": UPSTREAM_SHA256,
        "clock_out": str(args.clock_out),
        "t_begin": time.perf_counter(),
    }
    _install_clock(record)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "qwen3_asr_sft.py"
        script.write_bytes(body)
        sys.argv = [str(script), *script_args]
        runpy.run_path(str(script), run_name="__main__")
    args.clock_out.write_text(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
