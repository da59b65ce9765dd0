"""VADER vs DDPO vs Diffusion-DPO from one pre-trained model, under one reward and one reward-query budget.

    python -m lifecycle.bench.compare --pretrained outputs/demo/pretrain/export [--seeds 0 1 2] [--queries 480]
        [--out outputs/compare] [-- overrides for every stage, e.g. reward=colour]

Per seed, through the stages' own runners (the CLI's code path):
  * VADER: `queries / stage.batch_size` reward-gradient steps;
  * DDPO: `queries / (sample.batch_size · sample.num_batches)` epochs of sampling, scoring and PPO;
  * Diffusion-DPO: preference pairs sampled from the same model and labelled by the same reward
    (`queries` videos scored: every pair of 4 candidates per prompt), then DPO on them; the pairs'
    sampling time and queries are DPO's too, so its curve starts there.
All three sample with 10 DDIM steps and guidance 3. Each run measures its reward on the training prompts before its
first step and every few steps
(`stage.curve`, fixed noise, evaluation time not counted), and the before/after table on the
training and held-out prompts. The report (`<out>/report.md`) has the VADER paper's Table 1 layout
(mean ± std over seeds) and the plots reward_vs_queries.png and reward_vs_seconds.png (its Figure 7).
"""

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from .. import CONF_DIR
from ..data.prompts import load_prompts
from ..launch import run_stage

CANDIDATES = 4  # videos per prompt for the DPO pairs
POINTS = 8  # curve measurements per run, besides the one before training
DIRS = {"VADER": "vader", "DDPO": "ddpo", "Diffusion-DPO": "dpo"}


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def run_overrides(overrides: list[str]) -> dict:
    """Compose the config with `overrides` and run its stage as `python -m lifecycle` does (`run_stage`)."""
    return run_stage(config(overrides))


def plans(pretrained: str, seed: int, queries: int, out: Path, prompts: int, extra: list[str]) -> dict[str, list]:
    """Per method, the list of stage runs (each a list of overrides) that spends `queries` reward queries."""
    common = [f"model.pretrained={pretrained}", f"seed={seed}", "trainer.enable_progress_bar=false",
              *(o for o in extra if not o.startswith("stage."))]
    aligned = [*common, *(o for o in extra if o.startswith("stage."))]  # stage keys: the alignment stages only
    run_dir = {method: out / name / f"seed{seed}" for method, name in DIRS.items()}
    vader_steps = queries // 4
    ddpo_updates = 2 * (queries // 8)  # an epoch: 2 batches of 4 videos, one PPO minibatch (one update) each
    dpo_steps = 100
    pairs = run_dir["Diffusion-DPO"] / "pairs"
    return {
        "VADER": [["stage=vader", "stage.batch_size=4", f"stage.steps={vader_steps}",
                   f"stage.curve.every_n_steps={max(1, vader_steps // POINTS)}", f"run_dir={run_dir['VADER']}",
                   *aligned]],
        "DDPO": [["stage=ddpo", "stage.sample.num_steps=10", "stage.sample.batch_size=4", "stage.sample.num_batches=2",
                  "stage.ppo.batch_size=4",
                  "stage.ppo.inner_epochs=1", "stage.ppo.accumulate=1", f"stage.epochs={ddpo_updates // 2}",
                  f"stage.curve.every_n_steps={max(1, ddpo_updates // POINTS)}", f"run_dir={run_dir['DDPO']}",
                  *aligned]],
        "Diffusion-DPO": [
            ["stage=preferences", "stage.num_steps=10", f"stage.candidates={CANDIDATES}", "stage.strategy=all",
             "stage.min_margin=0",
             f"stage.repeats={max(1, queries // (CANDIDATES * prompts))}", f"stage.out={pairs}",
             f"run_dir={run_dir['Diffusion-DPO'] / 'preferences'}", *common],
            # lr 1e-3, not the stage's 1e-2: these pairs differ by little, and 1e-2 wrecks the model in 100 steps
            ["stage=dpo", f"stage.pairs={pairs}", f"stage.steps={dpo_steps}", "stage.optimizer.lr=1e-3",
             f"stage.curve.every_n_steps={dpo_steps // POINTS}", f"run_dir={run_dir['Diffusion-DPO']}", *aligned],
        ],
    }


def collect(out: Path, method: str, seed: int) -> dict:
    run_dir = out / DIRS[method] / f"seed{seed}"
    table = json.loads((run_dir / "report" / "table.json").read_text())
    curve = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()]
    return {"table": table, "curve": curve}


def mean_std(values: list[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def table_markdown(results: dict[str, dict[int, dict]]) -> str:
    """Table 1 layout: reward on training and held-out prompts per method (the base model first), plus the pixel
    oracle's colour/direction accuracy on the held-out prompts (not optimised), reward queries and seconds."""
    columns = [("train", "reward"), ("test", "reward"), ("test", "colour_accuracy"), ("test", "direction_accuracy")]
    header = ["reward (train)", "reward (held-out)", "colour acc. (held-out)", "direction acc. (held-out)",
              "reward queries", "seconds"]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    first = next(iter(results.values()))
    base = [mean_std([r["table"]["before"][split][key] for r in first.values()]) for split, key in columns]
    lines.append("| base | " + " | ".join(base) + " | 0 | 0 |")
    for method, runs in results.items():
        cells = [mean_std([r["table"]["after"][split][key] for r in runs.values()]) for split, key in columns]
        cells.append(str(round(statistics.mean(r["curve"][-1]["reward_queries"] for r in runs.values()))))
        cells.append(mean_std([r["curve"][-1]["seconds"] for r in runs.values()], 0))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[int, dict]], x: str, label: str, path: Path) -> None:
    """Reward on the training prompts against `x`: each seed thin, the mean over seeds thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, runs), colour in zip(results.items(), ("tab:red", "tab:blue", "tab:green")):
        curves = [r["curve"] for r in runs.values()]
        for c in curves:
            ax.plot([p[x] for p in c], [p["reward"] for p in c], color=colour, alpha=0.3, lw=1)
        n = min(len(c) for c in curves)
        xs = [statistics.mean(c[i][x] for c in curves) for i in range(n)]
        ys = [statistics.mean(c[i]["reward"] for c in curves) for i in range(n)]
        ax.plot(xs, ys, color=colour, lw=2.5, label=method, marker="o", ms=3)
        if xs[0] > 0:  # queries or seconds spent before training (DPO's pairs): the base model's reward meanwhile
            ax.plot([0, xs[0]], [ys[0], ys[0]], color=colour, lw=1.5, ls="--")
    ax.set_xlabel(label)
    ax.set_ylabel("reward (training prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: dict[str, dict[int, dict]], reward: str, queries: int, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, "reward_queries", "reward queries (videos scored)", out / "reward_vs_queries.png")
    plot(results, "seconds", "training wall-clock seconds (evaluation excluded)", out / "reward_vs_seconds.png")
    final = {m: statistics.mean(r["table"]["after"]["test"]["reward"] for r in runs.values())
             for m, runs in results.items()}
    order = " > ".join(sorted(final, key=final.get, reverse=True))
    text = "\n".join([
        "# VADER vs DDPO vs Diffusion-DPO on the embedded default", "",
        f"Reward: {reward}; budget: {queries} reward queries per method; seeds {list(next(iter(results.values())))};"
        " mean ± std over seeds.", "",
        table_markdown(results),
        f"Ordering by held-out reward: {order}.", "",
        "![reward against reward queries](reward_vs_queries.png)", "",
        "![reward against wall-clock seconds](reward_vs_seconds.png)", ""])
    (out / "report.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="bundle folder every method starts from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=480, help="reward queries (videos scored) per method")
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. reward=colour; "
                        "stage.* keys go to the VADER, DDPO and DPO stages only")
    args = parser.parse_args()
    if not Path(args.pretrained, "model_index.json").is_file():
        raise SystemExit(f"--pretrained: no bundle at {args.pretrained!r}; run `make demo` first")
    out = Path(args.out).resolve()
    overrides = ["reward=vivid", *args.overrides]
    prompts = len(load_prompts(config(["stage=vader", *overrides]).prompts.train, "prompts.train"))
    results = {}
    for seed in args.seeds:
        for method, runs in plans(str(Path(args.pretrained).resolve()), seed, args.queries, out, prompts,
                                  overrides).items():
            for run in runs:
                run_overrides(run)
            results.setdefault(method, {})[seed] = collect(out, method, seed)
    reward = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("reward="))
    print(report(results, reward, args.queries, out))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
