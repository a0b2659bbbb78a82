"""The study in one go: stage times, the stopwatch, and a run-by-run check against an earlier record.

    python benchmarks/real_study/one_go.py --record runs/real_study_1go/record \
        --previous benchmarks/real_study/results_composite.jsonl --wall-seconds S \
        > benchmarks/real_study/ONE_GO.md

`--record` is the record folder of a fresh `run.py` invocation (its own work dir and cache, nothing
reused); `--wall-seconds` is what an outside stopwatch (`/usr/bin/time`) measured for that whole
invocation. The machine's speed probes (`speed.json`, when the record has them) are printed beside
it. Every run present in both records is compared on the metrics `combine.py` compares; with
the same seeds, thread count and budget they should be identical. Per fraction, the ratio of the two
records' run seconds for the same runs shows how much the machine's speed differed between the days.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from thread_effect import _jsonl as _ok  # noqa: E402  (finished runs by name, as thread_effect reads them)

COMPARED = ("accuracy", "macro_f1", "val_macro_f1", "per_class", "confusion", "steps", "batch_size", "best_epoch")
STAGES = ("prcc_autoencoder", "cam16_resnet", "pilot", "sweep", "report")


def compare(new: dict[str, dict], old: dict[str, dict]) -> tuple[list[str], list[str]]:
    """(runs in both, runs whose compared metrics differ)."""
    both = sorted(set(new) & set(old))
    return both, [n for n in both if any(new[n].get(k) != old[n].get(k) for k in COMPARED)]


def seconds_by_fraction(new: dict[str, dict], old: dict[str, dict]) -> list[tuple[float, int, float, float]]:
    """(fraction, runs, new seconds, old seconds) over the runs present in both records; rows the earlier
    record reused from another day (they carry a `source`) are left out, so the ratio compares two days."""
    acc: dict[float, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for n in sorted(set(new) & set(old)):
        if "source" in old[n]:
            continue
        a = acc[new[n]["fraction"]]
        a[0] += 1
        a[1] += new[n]["seconds"]
        a[2] += old[n]["seconds"]
    return [(f, int(a[0]), a[1], a[2]) for f, a in sorted(acc.items())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--record", required=True, help="record folder of the one-go invocation")
    p.add_argument("--previous", required=True, help="results.jsonl of the earlier record")
    p.add_argument("--wall-seconds", type=float, required=True, help="outside stopwatch of the whole invocation")
    args = p.parse_args(argv)
    record = Path(args.record)
    timings = json.loads((record / "timings.json").read_text())
    machine = json.loads((record / "machine.json").read_text())
    new, old = _ok(record / "results.jsonl"), _ok(Path(args.previous))
    both, differ = compare(new, old)

    out = [f"machine: {json.dumps(machine)}", ""]
    if (record / "speed.json").is_file():  # the machine's speed at the start and the end (fusion.speed)
        out += [f"machine speed ({p['at']}, {p['when']}): {p['ms_per_step']} ms per CPU training step of the "
                f"WBC CNN (48 px, batch 64, {p['threads']} threads; repeats {p['all']})"
                for p in json.loads((record / "speed.json").read_text())] + [""]
    out += ["| stage | seconds | invocations |", "|---|---|---|"]
    for s in STAGES:
        if s in timings:
            out.append(f"| {s} | {timings[s]['seconds']:.1f} | {timings[s].get('invocations', '')} |")
    staged = sum(timings[s]["seconds"] for s in STAGES if s in timings)
    out += [f"| all stages | {staged:.1f} = {staged / 60:.1f} min | |",
            f"| outside stopwatch (`/usr/bin/time`, whole invocation) | {args.wall_seconds:.1f} = "
            f"{args.wall_seconds / 60:.1f} min | 1 |", "",
            f"sweep runs: {len(new)} finished; summed run seconds "
            f"{timings.get('sweep_runs_sum', {}).get('seconds', float('nan')):.1f}", "",
            f"run by run against `{Path(args.previous).name}`: {len(both)} runs in both, "
            f"{len(both) - len(differ)} identical in {', '.join(COMPARED)}; {len(differ)} differ"
            + (f": {', '.join(differ[:10])}" + (f" and {len(differ) - 10} more" if len(differ) > 10 else "")
               if differ else ""), "",
            "| fraction | runs in both | seconds, this record | seconds, earlier record | earlier / this |",
            "|---|---|---|---|---|"]
    for f, n, s_new, s_old in seconds_by_fraction(new, old):
        out.append(f"| {f:g} | {n} | {s_new:.0f} | {s_old:.0f} | {s_old / s_new:.2f} |")
    print("\n".join(out))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
