"""Does recaptioning make a model follow prompts? The same tiny model pre-trained for the same budget on the
same curated clips, once with their raw captions and once with the recaptions, then prompt fidelity (the pixel
oracle's colour and direction accuracy) on held-out prompts.

    python -m lifecycle.bench.recaption [--curated DIR] [--seeds 0 1] [--out outputs/recaption] [-- overrides ...]

Without `--curated`, it first runs `stage=curate` on the embedded raw world (data/raw-v1, written if missing).
The two runs differ only in `data.caption_key` (original_caption vs caption). Writes `<out>/summary.md`.
"""

import argparse
import json
import statistics
from pathlib import Path

from .compare import run_overrides

RUNS = {"raw captions": "original_caption", "recaptioned": "caption"}
COLUMNS = ("colour_accuracy", "direction_accuracy", "both_accuracy")


def run(curated: str, seeds: list[int], out: Path, overrides: list[str]) -> dict:
    """{run name: {seed: held-out row of the evaluation table}}."""
    rows = {name: {} for name in RUNS}
    for seed in seeds:
        dirs = {name: out / f"seed{seed}" / name.replace(" ", "_") for name in RUNS}
        for name, key in RUNS.items():
            run_overrides(["stage=pretrain", f"data.shards={curated}", "data.generate=null", f"data.caption_key={key}",
                           f"seed={seed}", f"run_dir={dirs[name]}", "trainer.enable_progress_bar=false", *overrides])
        evaluation = out / f"seed{seed}" / "eval"
        run_overrides(["stage=eval", "stage.metrics=false", f"stage.models=[{','.join(str(d) for d in dirs.values())}]",
                       "reward=vivid", f"seed={seed}", f"run_dir={evaluation}", "trainer.enable_progress_bar=false"])
        table = json.loads((evaluation / "report" / "table.json").read_text())
        for name, d in dirs.items():
            rows[name][seed] = table[d.name]["test"]
    return rows


def summary(rows: dict, curated: str) -> str:
    seeds = list(next(iter(rows.values())))
    lines = [f"Pre-training on {curated}, same model, steps and seeds {seeds}; held-out prompts, pixel oracle "
             "(mean ± std over seeds).", "", "| captions | " + " | ".join(c.replace("_", " ") for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, by_seed in rows.items():
        cells = [f"{statistics.mean(r[c] for r in by_seed.values()):.3f} ± "
                 f"{statistics.pstdev([r[c] for r in by_seed.values()]):.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curated", help="curated shards (stage=curate's out); default: curate the embedded raw world")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="outputs/recaption")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides for both pre-training runs, e.g. trainer.max_steps=500")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    curated = args.curated
    if curated is None:
        curated = str(out / "curate" / "shards")
        run_overrides(["stage=curate", f"stage.out={curated}", f"run_dir={out / 'curate'}"])
    rows = run(str(Path(curated).resolve()), args.seeds, out, args.overrides)
    text = summary(rows, curated)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
