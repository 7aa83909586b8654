"""WER of the start, GSPO and continued-SFT models per held-out set, with paired bootstrap CIs of the differences.

Usage: ``python recipes/gspo_vs_sft/compare.py exp/gspo_vs_sft [--systems start,gspo,sft] [--pairs gspo-sft]`` (reads
``eval_<system>/results-<set>.jsonl`` and ``<system>/cpu_time.txt``; prints a markdown report).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen3asr_train.data.manifest import read_jsonl
from qwen3asr_train.rl.bootstrap import paired_bootstrap

SYSTEMS = "start,gspo,sft"
"""Default systems (``eval_<name>`` directories); every later one is compared with every earlier one."""


def read_results(path: Path) -> dict[str, tuple[int, int]]:
    """Utterance id -> (errors, reference units) of the speech rows of one evaluation results file."""
    out: dict[str, tuple[int, int]] = {}
    for number, row in enumerate(read_jsonl(path), 1):
        try:
            counts = row["counts"]
            errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
            units = counts["ref_units"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: row {number}: not an evaluation result row ({err})") from err
        if units > 0:
            out[row["id"]] = (int(errors), int(units))
    return out


def cpu_seconds(path: Path) -> str:
    """``user + system`` CPU seconds and wall seconds from ``/usr/bin/time -f "%U %S %e"``."""
    if not path.exists():
        return "not measured"
    user, system, wall = (float(x) for x in path.read_text().split()[-3:])
    return f"{user + system:.0f} CPU-s ({user:.0f} user + {system:.0f} system), {wall:.0f} s wall"


def parse_pairs(spec: str, systems: list[str]) -> list[tuple[str, str]]:
    """``"a-b,c-d"`` -> ``[(a, b), (c, d)]``, each name one of ``systems``; empty: every later minus every earlier."""
    if not spec:
        return [(b, a) for i, a in enumerate(systems) for b in systems[i + 1 :]]
    pairs = []
    for item in spec.split(","):
        a, sep, b = item.partition("-")
        if not sep or a not in systems or b not in systems or a == b:
            raise SystemExit(f"--pairs: {item!r} is not 'a-b' with two different systems of {systems}")
        pairs.append((a, b))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp", type=Path)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default=SYSTEMS, help=f"comma-separated eval_<name> directories ({SYSTEMS})")
    parser.add_argument(
        "--pairs",
        default="",
        help="comma-separated a-b differences to report, e.g. gspo_s1-start,sft_s1-gspo_s1 (default: every later "
        "system minus every earlier one)",
    )
    args = parser.parse_args(argv)
    systems = args.systems.split(",")
    pairs = parse_pairs(args.pairs, systems)
    first = args.exp / f"eval_{systems[0]}"
    sets = sorted(p.name[len("results-") : -len(".jsonl")] for p in first.glob("results-*.jsonl"))
    if not sets:
        raise SystemExit(f"no results-*.jsonl in {first}")
    lines = ["| set | utts | " + " | ".join(f"{s} WER %" for s in systems) + " |", "|---|---|" + "---|" * len(systems)]
    diffs = ["| set | a − b | WER difference (points) | 95% CI | CI excludes 0 |", "|---|---|---|---|---|"]
    for name in sets:
        results = {s: read_results(args.exp / f"eval_{s}" / f"results-{name}.jsonl") for s in systems}
        ids = sorted(set.intersection(*(set(r) for r in results.values())))
        if any(len(r) != len(ids) for r in results.values()):
            raise ValueError(f"set {name}: the systems scored different utterances")
        units = [results[systems[0]][i][1] for i in ids]
        errors = {s: [results[s][i][0] for i in ids] for s in systems}
        rates = [100 * sum(errors[s]) / sum(units) for s in systems]
        lines.append(f"| {name} | {len(ids)} | " + " | ".join(f"{r:.1f}" for r in rates) + " |")
        for a, b in pairs:
            ci = paired_bootstrap(errors[a], errors[b], units, resamples=args.resamples, seed=args.seed)
            diffs.append(
                f"| {name} | {a} − {b} | {100 * ci.difference:+.1f} | [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] | "
                f"{'yes' if ci.excludes_zero else 'no'} |"
            )
    report = [
        "# GSPO vs continued SFT from the same start model",
        "",
        *(f"- {s}: {cpu_seconds(args.exp / s / 'cpu_time.txt')}" for s in systems[1:]),
        "",
        *lines,
        "",
        f"Paired bootstrap over utterances ({args.resamples} resamples, seed {args.seed}), corpus WER:",
        "",
        *diffs,
    ]
    print("\n".join(report))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
