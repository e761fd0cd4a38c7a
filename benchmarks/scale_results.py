"""Merge bench_train.py's JSON of several presets into one table of the seed's job at scale (issue 22).

    python benchmarks/scale_results.py OUT/scale_70b.json OUT/scale_13b.json --out benchmarks/results/scale.json

Each row keeps its preset and its run's settings; the environment is the first file's (each file keeps its own
under `runs`).
"""
import argparse
import json
from pathlib import Path

KEYS = ("preset", "impl", "step_s", "tokens_per_s", "peak_alloc_gib", "gpu_busy", "micro_batches", "max_tokens",
        "records_per_step")


def merge(paths: list[Path]) -> dict:
    runs = [json.loads(p.read_text()) for p in paths]
    rows = [{**{k: row.get(k) for k in KEYS}, "preset": run["settings"]["preset"]}
            for run in runs for row in run["rows"]]
    return {"environment": runs[0]["environment"], "rows": rows,
            "runs": [{"file": p.name, "settings": run["settings"], "environment": run["environment"]}
                     for p, run in zip(paths, runs)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="bench_train.py --out files")
    ap.add_argument("--out", type=Path, required=True, help="the merged JSON")
    args = ap.parse_args(argv)
    merged = merge(args.files)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print("| preset | impl | step_s | tokens_per_s | peak_alloc_gib | gpu_busy |\n| --- | --- | --- | --- | --- | --- |")
    for r in merged["rows"]:
        busy = "-" if r["gpu_busy"] is None else f"{r['gpu_busy']:.2f}"
        print(f"| {r['preset']} | {r['impl']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_alloc_gib']:.2f} | {busy} |")


if __name__ == "__main__":
    main()
