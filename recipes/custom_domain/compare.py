"""The custom-domain recipe's report: the base model vs (a) domain-only and (b) domain + replay fine-tuning.

For each model (``eval_base``, ``eval_ft_domain``, ``eval_ft_replay`` under the recipe's folder) and each set
(``domain``: held-out domain clips with the hot words as context; ``domain_nocontext``: the same clips without
it; ``general``: the base model's own held-out set), WER and CER are recomputed from the evaluation's
``results-<set>.jsonl`` rows with the evaluation's normaliser (the WER equals the evaluation's summary), plus:

* **domain-term recall**: of the hot-word occurrences in the references (the words listed in each row's
  ``context``), the share the hypothesis also contains (per utterance, ``min(ref count, hyp count)`` per word,
  words after the evaluation normaliser);
* **forgetting**: the general set's WER change from the base, in points.

Writes ``<exp>/table.md`` (the table below, for docs/results.md) and ``<exp>/comparison.png`` (bars per
set and model). Exit status 1 when a fine-tuned model's domain WER is not below the base's.

Usage: python recipes/custom_domain/compare.py exp/custom_domain
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's package, uninstalled

from qwen3asr_train.data.manifest import read_jsonl  # noqa: E402
from qwen3asr_train.eval.metrics import ErrorCounts, score_utterance  # noqa: E402
from qwen3asr_train.eval.normalize import NormalizerOptions  # noqa: E402
from qwen3asr_train.eval.plots import load_summary, write_before_after  # noqa: E402

MODELS = {"base": "base", "ft_domain": "(a) domain only", "ft_replay": "(b) domain + replay"}
SETS = ("domain", "domain_nocontext", "general")


def error_rates(rows: list[dict]) -> dict[str, float]:
    """Corpus WER and CER of evaluation rows (``reference``, parsed ``text``, ``language``)."""
    totals = {"word": ErrorCounts(), "char": ErrorCounts()}
    for row in rows:
        for unit in totals:
            totals[unit] += score_utterance(row["reference"], row["text"] or "", row["language"], unit=unit).counts
    return {"wer": totals["word"].rate, "cer": totals["char"].rate}


def hot_words(context: str, language: str | None, options: NormalizerOptions) -> set[str]:
    """The normalised words of a comma-separated hot-word ``context``."""
    return {w for item in context.split(",") for w in options.apply(item, language).split()}


def term_recall(rows: list[dict], contexts: dict[str, str]) -> tuple[int, int]:
    """``(found, total)`` hot-word occurrences: for each row, each reference word listed in the row's context
    counts once per occurrence, and is found as often as the hypothesis has it (at most the reference count).

    ``contexts`` maps utterance id -> context (from the manifest, so the no-context set is scored against the
    same list)."""
    options = NormalizerOptions()
    found = total = 0
    for row in rows:
        listed = hot_words(contexts.get(row["id"], ""), row["language"], options)
        ref = Counter(w for w in options.apply(row["reference"], row["language"]).split() if w in listed)
        hyp = Counter(options.apply(row["text"] or "", row["language"]).split())
        total += sum(ref.values())
        found += sum(min(n, hyp[w]) for w, n in ref.items())
    return found, total


def manifest_contexts(manifest: Path) -> dict[str, str]:
    """Utterance id -> ``context`` of a manifest's rows (rows without one are left out)."""
    return {r["id"]: r["context"] for r in read_jsonl(manifest) if r.get("context")}


def collect(exp: Path) -> dict[str, dict]:
    """Per model: ``{set: {"wer", "cer"}}`` plus ``recall`` / ``recall_nocontext`` as ``(found, total)``."""
    contexts = manifest_contexts(exp / "corpus" / "domain" / "test.jsonl")
    report: dict[str, dict] = {}
    for model in MODELS:
        folder = exp / f"eval_{model}"
        if not (folder / "summary.json").is_file():
            continue
        entry: dict = {}
        for name in SETS:
            path = folder / f"results-{name}.jsonl"
            if path.is_file():
                rows = read_jsonl(path)
                entry[name] = error_rates(rows)
                if name.startswith("domain"):
                    entry["recall" if name == "domain" else "recall_nocontext"] = term_recall(rows, contexts)
        report[model] = entry
    return report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _recall(pair: tuple[int, int] | None) -> str:
    if not pair or not pair[1]:
        return "–"
    return f"{100 * pair[0] / pair[1]:.1f} ({pair[0]}/{pair[1]})"


def table(report: dict[str, dict]) -> str:
    """The Markdown table of the report (one row per model)."""
    lines = [
        "| model | domain WER % | domain CER % | domain-term recall % | domain WER % without context | "
        "general WER % | general CER % | general WER change (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_general = report.get("base", {}).get("general", {}).get("wer")
    for model, entry in report.items():
        dom, plain, gen = entry.get("domain", {}), entry.get("domain_nocontext", {}), entry.get("general", {})
        change = "–"
        if base_general is not None and gen.get("wer") is not None and model != "base":
            change = f"{100 * (gen['wer'] - base_general):+.1f}"
        lines.append(
            f"| {MODELS[model]} | {_pct(dom.get('wer'))} | {_pct(dom.get('cer'))} | {_recall(entry.get('recall'))} | "
            f"{_pct(plain.get('wer'))} | {_pct(gen.get('wer'))} | {_pct(gen.get('cer'))} | {change} |"
        )
    return "\n".join(lines) + "\n"


def main(exp: Path) -> int:
    report = collect(exp)
    if "base" not in report:
        print(f"no base evaluation in {exp / 'eval_base'}: run stages 0-2 first", file=sys.stderr)
        return 2
    text = table(report)
    (exp / "table.md").write_text(text, encoding="utf-8")
    print(text)
    steps = {m: _last_step(exp / m) for m in MODELS if m != "base" and m in report}
    print("fine-tuning steps: " + ", ".join(f"{MODELS[m]} {s}" for m, s in steps.items()))
    chart = write_before_after(
        {MODELS[m]: load_summary(exp / f"eval_{m}") for m in report},
        exp / "comparison.png",
        title="custom domain: base vs fine-tuned (domain, domain without context, general)",
    )
    print(f"table: {exp / 'table.md'}  chart: {chart}")
    print(f"evaluations: {', '.join(str(exp / f'eval_{m}') for m in report)} (recogs/errs/wer-summary per set)")
    status = 0
    for model in report:
        if model != "base" and not report[model]["domain"]["wer"] < report["base"]["domain"]["wer"]:
            print(f"{MODELS[model]}: domain WER did not fall below the base's", file=sys.stderr)
            status = 1
    return status


def _last_step(run_dir: Path) -> str:
    """The optimizer step the run's export was taken at (its ``qwen3asr_train_run.json``), or ``?``."""
    record = run_dir / "export" / "qwen3asr_train_run.json"
    if not record.is_file():
        return "?"
    return str(json.loads(record.read_text(encoding="utf-8")).get("exported_from", {}).get("global_step", "?"))


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "exp/custom_domain")))
