"""Does VADER work on the embedded default? Reward and oracle fidelity before/after, over several seeds.

    python -m lifecycle.bench.vader_report --pretrained outputs/demo/pretrain/export [--seeds 0 1 2] [-- overrides ...]

Runs `stage=vader` once per seed from the pre-trained export (the same code path as the CLI), then
prints and writes `<out>/summary.md`: the optimised reward on the training and held-out prompts, and
the pixel-oracle colour/direction accuracy (not optimised) on the held-out prompts, as mean ± std.
"""

import argparse
import json
import statistics
from pathlib import Path

from .compare import run_overrides

COLUMNS = (("train", "reward"), ("test", "reward"), ("test", "colour_accuracy"), ("test", "direction_accuracy"))


def run(pretrained: str, seeds: list[int], out: Path, overrides: list[str]) -> dict:
    tables = {}
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        run_overrides(["stage=vader", f"model.pretrained={pretrained}", f"seed={seed}", f"stage.evaluation.seed={seed}",
                   f"run_dir={run_dir}", *overrides])
        tables[seed] = json.loads((run_dir / "report" / "table.json").read_text())
    return tables


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def summary(tables: dict, reward: str) -> str:
    header = [f"{key.replace('_accuracy', ' acc.')} ({split})" for split, key in COLUMNS]
    lines = [f"Reward optimised: {reward}; mean ± std over seeds {list(tables)}.", "",
             "| model | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for tag, label in (("before", "base"), ("after", "VADER")):
        cells = [mean_std([t[tag][split][key] for t in tables.values()]) for split, key in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="outputs/demo/pretrain/export",
                        help="bundle folder to align (make demo's export)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="outputs/vader_report")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. reward=colour stage.steps=100")
    args = parser.parse_args()
    if not Path(args.pretrained, "model_index.json").is_file():
        raise SystemExit(f"--pretrained: no bundle at {args.pretrained!r}; run `make demo` first")
    out = Path(args.out)
    tables = run(str(Path(args.pretrained).resolve()), args.seeds, out, args.overrides)
    reward = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("reward=")), "the config default")
    text = summary(tables, reward)
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
