"""VADER vs DDPO vs Diffusion-DPO vs GRPO vs DiffusionNFT from one pre-trained model, under one reward and one
reward-query budget, with a held-out judge beside each reward curve.

    python -m lifecycle.bench.compare --pretrained outputs/demo/pretrain/export [--seeds 0 1 2] [--queries 960]
        [--methods VADER GRPO ...] [--resolutions 16 32 64] [--out outputs/compare] [-- overrides, e.g. reward=colour]

Per seed, through the stages' own runners (the CLI's code path):
  * VADER: `queries / stage.batch_size` reward-gradient steps;
  * VADER + judge guard: the same run with `stage.judge_guard.action=stop`: it stops once the judge has fallen
    more than the margin while the reward rose, and evaluates and exports its best-by-judge weights;
  * DDPO: `queries / 8` epochs of sampling 8 videos, scoring and PPO (per-prompt advantages);
  * Diffusion-DPO: preference pairs sampled from the same model and labelled by the same reward (`queries` videos
    scored: every pair of 4 candidates per prompt), then DPO on them; the pairs' sampling time and queries are
    DPO's too, so its curve starts there;
  * GRPO: `queries / 16` epochs of 2 prompts x 8 videos (stochastic DDIM), group-normalised advantages, PPO + KL;
  * NFT: `queries / 16` epochs of 2 prompts x 8 videos (the deterministic sampler), DiffusionNFT on the forward
    process.
All sample with 10 steps and guidance 3. Each run measures its reward, each reward term and the judge (the pixel
oracle's colour and direction accuracy, which no method optimises) on the training prompts before its first step
and every few steps (`stage.curve`, fixed noise, evaluation time not counted), and the before/after table on the
training and held-out prompts. The report (`<out>/report.md`) has the VADER paper's Table 1 layout (mean ± std over
seeds), the reward queries and seconds each method needs to reach fixed shares of VADER's gain, and the plots
reward_vs_queries.png (reward beside judge), reward_vs_seconds.png (its Figure 7). `--resolutions` adds its Figure 4
(the gain of reward-gradient and policy-gradient methods as the resolution grows): `--resolution-methods` at each
resolution, seed `--seeds[0]`, in `<out>/resolution/`.

A finished run is not run again (its run directory's compare.json records its overrides and result): run seeds side
by side (`--seeds 0` and `--seeds 1` in two processes, then all seeds once more to collect them into the report).
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
DIRS = {"VADER": "vader", "VADER + judge guard": "vader_guard", "DDPO": "ddpo", "Diffusion-DPO": "dpo",
        "GRPO": "grpo", "NFT": "nft"}
COLOURS = dict(zip(DIRS, ("tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown")))
JUDGE = ["colour_accuracy", "direction_accuracy"]  # the pixel oracle: what no method optimises
LEVELS = (0.25, 0.5, 0.75)  # shares of VADER's mean gain on the training prompts


def config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def run_overrides(overrides: list[str]) -> dict:
    """Compose the config with `overrides` and run its stage as `python -m lifecycle` does (`run_stage`)."""
    return run_stage(config(overrides))


def plans(pretrained: str, seed: int, queries: int, out: Path, prompts: int, extra: list[str],
          methods: list[str] | None = None) -> dict[str, list]:
    """Per method, the list of stage runs (each a list of overrides) that spends `queries` reward queries."""
    common = [f"model.pretrained={pretrained}", f"seed={seed}", "trainer.enable_progress_bar=false",
              *(o for o in extra if not o.startswith("stage."))]
    judged = [f"stage.judge=[{','.join(JUDGE)}]", "stage.judge_guard.action=log"]
    aligned = [*common, *judged, *(o for o in extra if o.startswith("stage."))]  # stage keys: alignment stages only
    run_dir = {method: out / name / f"seed{seed}" for method, name in DIRS.items()}

    def every(steps: int) -> str:
        return f"stage.curve.every_n_steps={max(1, steps // POINTS)}"

    vader_steps = queries // 4
    ddpo_updates = 2 * (queries // 8)  # an epoch: 2 batches of 4 videos, one PPO minibatch (one update) each
    group_epochs = queries // 16  # GRPO, NFT: an epoch is 2 prompts x 8 videos, two updates of 8
    dpo_steps = 100
    pairs = run_dir["Diffusion-DPO"] / "pairs"
    vader = ["stage=vader", "stage.batch_size=4", f"stage.steps={vader_steps}", every(vader_steps)]
    grouped = ["stage.sample.batch_size=8", "stage.sample.num_batches=2", "stage.sample.group_size=8",
               "stage.sample.num_steps=10", f"stage.epochs={group_epochs}", every(2 * group_epochs)]
    every_plan = {
        "VADER": [[*vader, f"run_dir={run_dir['VADER']}", *aligned]],
        "VADER + judge guard": [[*vader, f"run_dir={run_dir['VADER + judge guard']}", *aligned,
                                 "stage.judge_guard.action=stop"]],
        "DDPO": [["stage=ddpo", "stage.sample.num_steps=10", "stage.sample.batch_size=4", "stage.sample.num_batches=2",
                  "stage.ppo.batch_size=4", "stage.ppo.inner_epochs=1", "stage.ppo.accumulate=1",
                  f"stage.epochs={ddpo_updates // 2}", every(ddpo_updates), f"run_dir={run_dir['DDPO']}", *aligned]],
        "Diffusion-DPO": [
            ["stage=preferences", "stage.num_steps=10", f"stage.candidates={CANDIDATES}", "stage.strategy=all",
             "stage.min_margin=0",
             f"stage.repeats={max(1, queries // (CANDIDATES * prompts))}", f"stage.out={pairs}",
             f"run_dir={run_dir['Diffusion-DPO'] / 'preferences'}", *common],
            # lr 1e-3, not the stage's 1e-2: these pairs differ by little, and 1e-2 wrecks the model in 100 steps
            ["stage=dpo", f"stage.pairs={pairs}", f"stage.steps={dpo_steps}", "stage.optimizer.lr=1e-3",
             every(dpo_steps), f"run_dir={run_dir['Diffusion-DPO']}", *aligned],
        ],
        # lr 1e-2, not the stage's 3e-4: at 3e-4 the reward had not moved after 288 queries (0.3669 -> 0.3670)
        "GRPO": [["stage=grpo", *grouped, "stage.ppo.batch_size=8", "stage.optimizer.lr=1e-2",
                  f"run_dir={run_dir['GRPO']}", *aligned]],
        "NFT": [["stage=nft", *grouped, "stage.train.batch_size=8", f"run_dir={run_dir['NFT']}", *aligned]],
    }
    return {m: every_plan[m] for m in (methods or DIRS)}


def collect(out: Path, method: str, seed: int, result: dict) -> dict:
    run_dir = out / DIRS[method] / f"seed{seed}"
    table = json.loads((run_dir / "report" / "table.json").read_text())
    curve = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()]
    return {"table": table, "curve": curve, "judge": result.get("judge")}


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


def crossing(curve: list[dict], level: float) -> dict | None:
    """Reward queries and seconds where `curve` first reaches `level`, linearly between its points; None if never."""
    for before, point in zip([None, *curve], curve):
        if point["reward"] >= level:
            if before is None or point["reward"] == before["reward"]:
                return {k: point[k] for k in ("reward_queries", "seconds")}
            w = (level - before["reward"]) / (point["reward"] - before["reward"])
            return {k: before[k] + w * (point[k] - before[k]) for k in ("reward_queries", "seconds")}
    return None


def levels_markdown(results: dict[str, dict[int, dict]], reference: str = "VADER") -> str:
    """Per method, the reward queries and seconds to reach start + f x (reference's mean gain) on the training-prompt
    curve, each seed against its own start; the mean over the seeds that reached it (and how many did)."""
    ref = results[reference].values()
    gain = statistics.mean(r["curve"][-1]["reward"] - r["curve"][0]["reward"] for r in ref)
    header = [f"{round(100 * f)}% ({f * gain:+.4f})" for f in LEVELS]
    lines = [f"| method | {' | '.join(header)} |", "|---" * (len(LEVELS) + 1) + "|"]
    for method, runs in results.items():
        cells = []
        for f in LEVELS:
            hits = [crossing(r["curve"], r["curve"][0]["reward"] + f * gain) for r in runs.values()]
            hits = [h for h in hits if h is not None]
            if not hits:
                cells.append("not reached")
                continue
            q, s = (statistics.mean(h[k] for h in hits) for k in ("reward_queries", "seconds"))
            cells.append(f"{q:.0f} q, {s:.0f} s" + (f" ({len(hits)}/{len(runs)} seeds)" if len(hits) < len(runs) else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_curve(curves: list[list[dict]], x: str, y: str) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    return ([statistics.mean(c[i][x] for c in curves) for i in range(n)],
            [statistics.mean(c[i][y] for c in curves) for i in range(n)])


def plot(results: dict[str, dict[int, dict]], x: str, label: str, path: Path, judge: bool = False) -> None:
    """Reward on the training prompts against `x` (with `judge`, the judge beside it): each seed thin, the mean
    over seeds thick; a cross where a judge guard tripped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward", "reward (training prompts)")]
    if judge:
        keys.append(("judge", "judge: oracle colour/direction accuracy"))
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, (y, ylabel) in zip(axes[0], keys):
        for method, runs in results.items():
            colour = COLOURS.get(method, "tab:gray")
            curves = [r["curve"] for r in runs.values() if all(y in p for p in r["curve"])]
            if not curves:
                continue
            for c in curves:
                ax.plot([p[x] for p in c], [p[y] for p in c], color=colour, alpha=0.3, lw=1)
                ax.plot([p[x] for p in c if p.get("judge_guard")], [p[y] for p in c if p.get("judge_guard")], "x",
                        color=colour, ms=9, mew=2)
            xs, ys = _mean_curve(curves, x, y)
            style = "--" if method == "VADER + judge guard" else "-"  # it follows VADER's curve until it stops
            ax.plot(xs, ys, color=colour, lw=2.5, ls=style, label=method, marker="o", ms=3)
            if xs[0] > 0:  # queries or seconds spent before training (DPO's pairs): the base model's value meanwhile
                ax.plot([0, xs[0]], [ys[0], ys[0]], color=colour, lw=1.5, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def guard_markdown(results: dict[str, dict[int, dict]]) -> str:
    """What the judge guard did on each seed, beside the unguarded run's end."""
    guarded, free = results.get("VADER + judge guard"), results.get("VADER")
    if not guarded or not free:
        return ""
    lines = ["| seed | best judge (step) | tripped at step (reward, judge) | unguarded end: reward, judge | "
             "exported: held-out colour / direction acc. (unguarded) |", "|---|---|---|---|---|"]
    for seed, run in guarded.items():
        j, end = run["judge"] or {}, free[seed]["curve"][-1]
        best, tripped = j.get("best") or {}, j.get("tripped")
        trip = f"{tripped['step']} ({tripped['reward']:.4f}, {tripped['judge']:.3f})" if tripped else "did not trip"
        test, free_test = run["table"]["after"]["test"], free[seed]["table"]["after"]["test"]
        lines.append(f"| {seed} | {best.get('judge', float('nan')):.3f} ({best.get('step')}) | {trip} | "
                     f"{end['reward']:.4f}, {end['judge']:.3f} | {test['colour_accuracy']:.3f} / "
                     f"{test['direction_accuracy']:.3f} ({free_test['colour_accuracy']:.3f} / "
                     f"{free_test['direction_accuracy']:.3f}) |")
    return "\n".join(lines) + "\n"


def resolution_markdown(gains: dict[int, dict[str, dict]]) -> str:
    """Per resolution, each method's reward gain (after − before, training and held-out prompts)."""
    methods = list(next(iter(gains.values())))
    lines = ["| resolution | " + " | ".join(f"{m} gain (train / held-out)" for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for res, row in sorted(gains.items()):
        lines.append(f"| {res} px | " + " | ".join(f"{row[m]['train']:+.4f} / {row[m]['test']:+.4f}" for m in methods)
                     + " |")
    return "\n".join(lines) + "\n"


def gains_of(run: dict) -> dict[str, float]:
    t = run["table"]
    return {split: t["after"][split]["reward"] - t["before"][split]["reward"] for split in ("train", "test")}


def report(results: dict[str, dict[int, dict]], reward: str, queries: int, out: Path,
           resolution: dict[int, dict[str, dict]] | None = None, resolution_seed: int = 0,
           resolution_queries: int | None = None) -> str:
    (out / "results.json").write_text(json.dumps({"methods": results, "resolution": resolution}, indent=1))
    plot(results, "reward_queries", "reward queries (videos scored)", out / "reward_vs_queries.png", judge=True)
    plot(results, "seconds", "training wall-clock seconds (evaluation excluded)", out / "reward_vs_seconds.png")
    final = {m: statistics.mean(r["table"]["after"]["test"]["reward"] for r in runs.values())
             for m, runs in results.items()}
    order = " > ".join(sorted(final, key=final.get, reverse=True))
    text = [
        f"# {' vs '.join(results)} on the embedded default", "",
        f"Reward: {reward}; budget: {queries} reward queries per method; seeds {list(next(iter(results.values())))};"
        " mean ± std over seeds.", "",
        table_markdown(results),
        f"Ordering by held-out reward: {order}.", ""]
    if "VADER" in results:
        text += ["Reward queries (q) and training seconds (s) to reach a share of VADER's mean gain on the training "
                 "prompts (curve points linearly interpolated):", "", levels_markdown(results)]
    if guard := guard_markdown(results):
        text += [f"Judge guard (margin {next(iter(results['VADER + judge guard'].values()))['judge']['margin']}): "
                 "the guarded run stops when the judge falls past the margin while the reward rises, and exports its "
                 "best-by-judge weights:", "", guard]
    text += ["![reward and judge against reward queries](reward_vs_queries.png)", "",
             "![reward against wall-clock seconds](reward_vs_seconds.png)", ""]
    if resolution:
        text += [f"Reward gain by resolution (the VADER paper's Figure 4; seed {resolution_seed}, "
                 f"{resolution_queries or queries} reward "
                 "queries per run):", "",
                 resolution_markdown(resolution), "![gain against resolution](resolution_gain.png)", ""]
        plot_resolution(resolution, out / "resolution_gain.png")
    (out / "report.md").write_text("\n".join(text))
    return "\n".join(text)


def plot_resolution(gains: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    sizes = sorted(gains)
    for method in next(iter(gains.values())):
        ax.plot(sizes, [gains[s][method]["train"] for s in sizes], marker="o", color=COLOURS.get(method), label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s} px" for s in sizes])
    ax.set_xlabel("resolution")
    ax.set_ylabel("reward gain (training prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_plan(plan: list[list[str]]) -> dict:
    """Run each stage of `plan`, skipping one whose run directory holds the result of the same overrides (a finished
    run: `make compare` after an interruption, or seeds run side by side, goes on where it stopped); the last result."""
    result = {}
    for overrides in plan:
        done = Path(next(o for o in overrides if o.startswith("run_dir=")).split("=", 1)[1]) / "compare.json"
        if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
            result = json.loads(done.read_text())["result"]
            continue
        result = run_overrides(overrides)
        done.parent.mkdir(parents=True, exist_ok=True)  # a stage without checkpoints may leave no run directory
        done.write_text(json.dumps({"overrides": overrides, "result": result}, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="bundle folder every method starts from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--queries", type=int, default=960, help="reward queries (videos scored) per method")
    parser.add_argument("--methods", nargs="+", default=list(DIRS), choices=list(DIRS), metavar="METHOD",
                        help=f"of {list(DIRS)}")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[], help="Figure 4: e.g. 16 32 64")
    parser.add_argument("--resolution-methods", nargs="+", default=["VADER", "GRPO"], choices=list(DIRS))
    parser.add_argument("--resolution-queries", type=int, help="reward queries per run there (default: --queries)")
    parser.add_argument("--out", default="outputs/compare")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. reward=colour; "
                        "stage.* keys go to the alignment stages only")
    args = parser.parse_args()
    if not Path(args.pretrained, "model_index.json").is_file():
        raise SystemExit(f"--pretrained: no bundle at {args.pretrained!r}; run `make demo` first")
    out = Path(args.out).resolve()
    pretrained = str(Path(args.pretrained).resolve())
    overrides = ["reward=vivid", *args.overrides]
    prompts = len(load_prompts(config(["stage=vader", *overrides]).prompts.train, "prompts.train"))
    results = {}
    for seed in args.seeds:
        for method, plan in plans(pretrained, seed, args.queries, out, prompts, overrides, args.methods).items():
            results.setdefault(method, {})[seed] = collect(out, method, seed, run_plan(plan))
    resolution, seed = {}, args.seeds[0]
    queries = args.resolution_queries or args.queries
    default = config(["stage=vader", *overrides]).stage.resolution  # the main comparison's: its runs are reused
    for res in args.resolutions:
        folder = out / "resolution" / f"{res}px"
        for method, plan in plans(pretrained, seed, queries, folder, prompts,
                                  [*overrides, f"stage.resolution={res}"], args.resolution_methods).items():
            reuse = res == default and queries == args.queries and method in results
            run = results[method][seed] if reuse else collect(folder, method, seed, run_plan(plan))
            resolution.setdefault(res, {})[method] = gains_of(run)
    reward = next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("reward="))
    print(report(results, reward, args.queries, out, resolution or None, seed, queries))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
