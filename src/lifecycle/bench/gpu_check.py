"""Everything that needs a GPU, in one command (`make gpu-check`): a report of what ran on CUDA and how fast.

    python -m lifecycle.bench.gpu_check [--dry-run] [--out outputs/gpu-check] [--sections smoke fsdp real bench]

Sections, in this order (each in child processes; a failure is reported and the next section runs):
  * smoke: `recipe=smoke trainer=gpu`, every stage on CUDA in bf16 (validation and evaluation included):
    seconds and the headline figure of each stage;
  * fsdp: pre-training under FSDP2 over NCCL on every visible GPU with sharded (DCP) checkpoints; a run is
    SIGKILLed after its first checkpoint and resumed with `trainer.resume=last`, and its loss curve is compared
    step by step with an uninterrupted run's;
  * real: the first training stage of each real-model recipe (recipes/<name>.yaml) at the real shapes with random
    weights (`model.pretrained=null`; reward backbones from `models.stand_ins`) for a few steps: seconds per
    optimizer step and peak GPU memory, with the recipe's own memory keys;
  * bench: `make bench --gpu` cases (bench/train_step.py): the project's step against the plain loop, MFU.
It stops starting sections once `--budget` seconds have passed. `--dry-run` runs the same code on the CPU with
tiny shapes (miniature models and rewards, the CPU trainer, a CPU bench case), so its wiring is tested in the suite.
Writes gpu-check.json and gpu-check.md to `--out` after every section (a timeout loses nothing that finished).
"""

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import CONF_DIR
from ..launch import run_stage
from ..models.stand_ins import REWARD_KEYS, model_folder, recipe_rewards, reward_folder
from ..recipes import load_recipe
from ..summary import headline, seconds
from . import train_step

SECTIONS = ("smoke", "fsdp", "real", "bench")
TRAINING_STAGES = ("pretrain", "sft", "dpo", "ddpo", "grpo", "vader", "reward_model")
# Per real recipe: overrides that shorten its first training stage to a few steps without changing its shapes or
# memory keys (evaluation: 2 sampling steps of the held-out prompts; no curve), and stand-ins for data it reads.
REAL = {
    "modelscope_vader": ["stage.steps=4", "stage.accumulate=1", "stage.evaluation.num_steps=2",
                         "prompts.train=[a cat playing the piano]", "prompts.test=[a dog riding a bicycle]"],
    "sd15_ddpo": ["stage.epochs=1", "stage.sample.num_batches=2", "stage.sample.num_steps=10",
                  "stage.ppo.accumulate=1", "stage.evaluation.num_steps=2",
                  "prompts.train=[a cat, a dog]", "prompts.test=[a fox]"],
    "svd_vader_long": ["stage.steps=3", "stage.accumulate=1", "stage.evaluation.num_steps=2", "stage.condition=synthetic",
                       "prompts.train=[a large red circle moving left quickly on a silver background]",
                       "prompts.test=[a small blue circle moving left quickly on a gray background]"],
    "wan_grpo": ["stage.epochs=1", "stage.sample.num_steps=10", "stage.ppo.accumulate=1", "stage.evaluation.num_steps=2",
                 "prompts.train=[a cat playing the piano]", "prompts.test=[a koala drinking coffee]"],
}
DRY_REAL = {  # CPU: the recipe's classes at miniature width, a few tiny frames
    "modelscope_vader": ["stage.frames=4", "stage.resolution=32", "stage.sampling.num_steps=3"],
    "sd15_ddpo": ["stage.resolution=32", "stage.sample.batch_size=2", "stage.ppo.batch_size=1",
                  "stage.sample.num_steps=3"],
    "svd_vader_long": ["stage.frames=4", "stage.resolution=32", "stage.sampling.num_steps=3", "stage.clips=2"],
    "wan_grpo": ["stage.frames=5", "stage.resolution=32", "stage.sample.batch_size=2", "stage.sample.num_batches=1",
                 "stage.sample.group_size=2", "stage.sample.num_steps=3", "stage.ppo.batch_size=1"],
}
# The keys that decide a training step's memory, as the report's memory table states them.
MEMORY_KEYS = ("batch_size", "sample.batch_size", "ppo.batch_size", "lora.rank", "sampling.grad_steps", "decode_frames",
               "clips", "memory.gradient_checkpointing", "memory.frozen_dtype", "memory.offload_activations",
               "gradient_checkpointing")
FSDP_ARGS = [
    "stage=pretrain", "model.text_encoder.config.num_hidden_layers=1",
    "stage.curriculum=[{name:a,resolution:32,frames:8,batch_size:8,steps:40}]", "stage.lr_scheduler.warmup_steps=5",
    "stage.validation.every_n_steps=0", "stage.validation.num_steps=2", "stage.validation.prompts.n=2",
    "trainer.checkpoint_every_n_steps=10", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
    "data.num_workers=0", "data.generate.num_clips=256", "data.generate.clips_per_shard=64",
]


def lifecycle(*args: str, timeout: float | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m lifecycle <args>` in a child process; its output is kept in `log`."""
    done = subprocess.run([sys.executable, "-m", "lifecycle", *args], capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    return done


def tail(done: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-n:])


def trainer_args(dry: bool) -> list[str]:
    return ["trainer=cpu"] if dry else ["trainer=gpu"]


# -- sections -------------------------------------------------------------------------------------
def smoke(out: Path, dry: bool, recipe: str) -> dict:
    run_dir = out / "smoke"
    done = lifecycle(f"recipe={recipe}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
                     *trainer_args(dry), log=out / "smoke.log")
    if done.returncode:
        raise RuntimeError(f"recipe={recipe} exited {done.returncode}:\n{tail(done)}")
    stages = json.loads((run_dir / "recipe.json").read_text())["stages"]
    return {"recipe": recipe, "stages": [{"stage": name, "seconds": seconds(r), "result": headline(r)}
                                         for name, r in stages.items()]}


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def fsdp(out: Path, dry: bool) -> dict:
    """An uninterrupted FSDP2 run, and one SIGKILLed after its first checkpoint then resumed: same loss curve."""
    strategy = ["trainer=fsdp", *(["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]
                                  if dry else [])]
    common = [*FSDP_ARGS, *strategy, f"data.shards={out / 'fsdp-shards'}"]
    if dry:  # checkpoints at 10 and 20: enough to kill after the first
        common.append("stage.curriculum=[{name:a,resolution:16,frames:8,batch_size:4,steps:20}]")
    straight = out / "fsdp-straight"
    done = lifecycle(*common, f"hydra.run.dir={straight}", log=out / "fsdp-straight.log")
    if done.returncode:
        raise RuntimeError(f"uninterrupted FSDP run exited {done.returncode}:\n{tail(done)}")
    killed = out / "fsdp-killed"
    child = subprocess.Popen([sys.executable, "-m", "lifecycle", *common, f"hydra.run.dir={killed}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = killed / "checkpoints" / "step000010.ckpt"
    while child.poll() is None and not (first / ".metadata").exists():
        time.sleep(0.02)
    if child.poll() is not None:
        raise RuntimeError(f"the run ended (status {child.returncode}) before its first checkpoint could be awaited")
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    partial = losses(killed)
    done = lifecycle(*common, f"hydra.run.dir={killed}", "trainer.resume=last", log=out / "fsdp-resumed.log")
    if done.returncode:
        raise RuntimeError(f"resumed FSDP run exited {done.returncode}:\n{tail(done)}")
    a, b = losses(straight), losses(killed)
    diffs = [abs(b[s] - a[s]) / max(abs(a[s]), 1e-12) for s in a if s in b]
    files = sorted(p.name for p in (killed / "checkpoints" / "last.ckpt").iterdir())
    return {"devices": torch.cuda.device_count() if not dry else 1, "steps": len(a),
            "last_step_logged_before_the_kill": max(partial, default=None),
            "steps_missing_from_the_resumed_log": sorted(set(a) - set(b)),
            "max_relative_loss_difference": max(diffs), "final_loss": [a[max(a)], b[max(b)]],
            "checkpoint_files": files}


def real(out: Path, dry: bool, budget_end: float) -> dict:
    """Each real recipe's first training stage, a few steps, in its own process: s/step and peak memory."""
    folders = out / "stand-ins"
    dtype = torch.float32 if dry else torch.bfloat16
    rewards = {}
    rows = []
    for name, extra in REAL.items():
        if time.time() > budget_end:
            rows.append({"recipe": name, "error": "skipped: time budget"})
            continue
        recipe = OmegaConf.to_container(load_recipe(name), resolve=False)  # ${oc.env:...} data paths: overridden below
        stage = next(s for s in recipe["stages"] if set(s["overrides"]) & {f"stage={k}" for k in TRAINING_STAGES})
        model = next(o.split("=", 1)[1] for o in recipe["overrides"] if o.startswith("model="))
        used = recipe_rewards(recipe["overrides"])
        for r in used:
            if r not in rewards:
                rewards[r] = reward_folder(r, folders / r, miniature=dry, dtype=dtype)
        overrides = [*recipe["overrides"], *stage["overrides"], *extra, *trainer_args(dry),
                     *(f"{REWARD_KEYS[r]}={rewards[r]}" for r in used), "trainer.enable_progress_bar=false"]
        if dry:
            mini = model_folder(model, folders / model, miniature=True)
            overrides += [f"model.pretrained={mini}", *DRY_REAL[name]]
        else:
            overrides.append("model.pretrained=null")
        result = out / f"real-{name}.json"
        child = subprocess.run([sys.executable, "-m", __spec__.name, "--child", str(result), "--",
                                f"run_dir={out / 'real' / name}", *overrides], capture_output=True, text=True)
        (out / f"real-{name}.log").write_text(child.stdout + child.stderr)
        row = {"recipe": name, "stage": stage["name"], "model": model}
        if result.is_file():
            row.update(json.loads(result.read_text()))
        if child.returncode:
            row["error"] = tail(child, 8)
        rows.append(row)
    return {"rows": rows}


def child(result: Path, overrides: list[str]) -> None:
    """One stage in this process; every optimizer step's end time and the GPU memory peak between steps."""
    marks, peaks = [], []
    cuda = torch.cuda.is_available()

    def step_end(optimizer, args, kwargs):
        if cuda:
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        marks.append(time.perf_counter())

    register_optimizer_step_post_hook(step_end)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    started = {}

    def start(validated: DictConfig) -> None:
        started.update(cfg=validated, at=time.perf_counter())

    try:
        run_stage(cfg, on_start=start)
    finally:  # the steps measured so far are kept when the stage fails after training (its evaluation, export)
        if started:
            write_measurements(result, started["cfg"], marks, peaks, started["at"])


def write_measurements(result: Path, cfg, marks: list[float], peaks: list[int], began: float) -> None:
    steps = [b - a for a, b in zip(marks, marks[1:])]
    result.write_text(json.dumps({
        "optimizer_steps": len(marks), "seconds_per_step": statistics.median(steps) if steps else None,
        # the first step's window also holds model loading and the before-training evaluation
        "training_peak_gib": max(peaks[1:]) / 2**30 if peaks[1:] else None,
        "stage_seconds": round(time.perf_counter() - began, 1),
        "keys": {k: OmegaConf.select(cfg.stage, k) for k in MEMORY_KEYS if OmegaConf.select(cfg.stage, k) is not None},
        "frames": cfg.stage.get("frames"), "resolution": cfg.stage.get("resolution"),
    }))


def bench(out: Path, dry: bool, cases: list[str], steps: int, warmup: int, budget_end: float) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    peak = train_step.peak_flops(device)
    rows, skipped = [], []
    for name in cases:
        if time.time() > budget_end:
            skipped.append(name)
            continue
        try:
            rows += train_step.run_case(name, steps, warmup, peak)
        except SystemExit as e:  # a failed case says so and the next one runs
            skipped.append(f"{name} (failed: {str(e)[-500:]})")
    ratios = {p["case"]: life["samples_per_s"] / p["samples_per_s"] for p, life in zip(rows[::2], rows[1::2])}
    return {"rows": rows, "speed_ratio": ratios, "skipped": skipped, "table": train_step.table(rows) if rows else ""}


# -- report ---------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check{' (dry run, CPU)' if report['dry_run'] else ''}", "",
             f"{env['device']}; torch {env['torch']}, CUDA {env['cuda']}; {report['seconds']:.0f} s in all.", ""]
    for name in SECTIONS:
        if name not in report["sections"]:
            continue
        sec = report["sections"][name]
        lines += [f"## {name}", ""]
        if "error" in sec:
            lines += ["FAILED:", "```", sec["error"], "```", ""]
            continue
        if name == "smoke":
            lines += ["| stage | seconds | result |", "|---|---|---|"]
            lines += [f"| {r['stage']} | {r['seconds'] or 0:.0f} | {r['result']} |" for r in sec["stages"]]
        elif name == "fsdp":
            lines += [f"- {k}: {v}" for k, v in sec.items() if k != "seconds"]
        elif name == "real":
            lines += ["| recipe | stage | frames x px | s / optimizer step | training peak (GiB) | memory keys |",
                      "|---|---|---|---|---|---|"]
            for r in sec["rows"]:
                if "seconds_per_step" not in r:
                    lines.append(f"| {r['recipe']} | {r.get('stage', '')} | — | — | — | {r['error'][-300:]!r} |")
                    continue
                step = "—" if r["seconds_per_step"] is None else f"{r['seconds_per_step']:.2f}"
                memory = "—" if r["training_peak_gib"] is None else f"{r['training_peak_gib']:.1f}"
                lines.append(f"| {r['recipe']} | {r['stage']} | {r['frames']} x {r['resolution']} | {step} | {memory} "
                             f"| {', '.join(f'{k}={v}' for k, v in r['keys'].items())} |")
            lines += [f"\n{r['recipe']} failed after {r.get('optimizer_steps', 0)} optimizer steps:\n```\n{r['error']}\n```"
                      for r in sec["rows"] if "error" in r and "seconds_per_step" in r]
        elif name == "bench":
            lines += [sec["table"], ""]
            lines += [f"- {case}: speed ratio {ratio:.3f}" for case, ratio in sec["speed_ratio"].items()]
            if sec["skipped"]:
                lines.append(f"- not run {', '.join(sec['skipped'])}")
        lines += ["", f"({sec['seconds']:.0f} s)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (the suite runs this)")
    parser.add_argument("--out", default="outputs/gpu-check")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--smoke-recipe", default="smoke")
    parser.add_argument("--cases", nargs="+", choices=list(train_step.CASES),
                        default=["modelscope_16f_256", "wan_1_3b_33f_480x832", "sd15_256"])
    parser.add_argument("--steps", type=int, default=10, help="bench: timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420, help="seconds after which no new section starts")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(Path(args.child), [r for r in rest if r != "--"])
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (--dry-run runs the same code on the CPU)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("smoke", "fsdp-straight", "fsdp-killed", "real"):  # run directories of an earlier check
        shutil.rmtree(out / name, ignore_errors=True)
    start = time.time()
    budget_end = start + args.budget
    env = {"device": torch.cuda.get_device_name() if not args.dry_run else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    report = {"dry_run": args.dry_run, "environment": env, "sections": {}, "seconds": 0.0}
    cases = ["tiny_image"] if args.dry_run else args.cases
    if args.dry_run:
        args.steps, args.warmup = 2, 1
    run = {"smoke": lambda: smoke(out, args.dry_run, args.smoke_recipe), "fsdp": lambda: fsdp(out, args.dry_run),
           "real": lambda: real(out, args.dry_run, budget_end),
           "bench": lambda: bench(out, args.dry_run, cases, args.steps, args.warmup, budget_end)}
    for name in args.sections:
        began = time.time()
        if began > budget_end:
            report["sections"][name] = {"error": "skipped: time budget", "seconds": 0.0}
        else:
            print(f"gpu-check: {name} ...", flush=True)
            try:
                report["sections"][name] = run[name]()
            except Exception as e:  # noqa: BLE001 - reported; the next section still runs
                report["sections"][name] = {"error": f"{type(e).__name__}: {e}"}
            report["sections"][name]["seconds"] = time.time() - began
        report["seconds"] = time.time() - start
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu-check.md").write_text(markdown(report))
    print((out / "gpu-check.md").read_text())
    failed = [n for n, s in report["sections"].items() if "error" in s or any("error" in r for r in s.get("rows", []))]
    if failed:
        raise SystemExit(f"gpu-check: failed or skipped: {', '.join(failed)} (see {out / 'gpu-check.md'})")


if __name__ == "__main__":
    main()
