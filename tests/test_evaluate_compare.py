"""Side-by-side evaluation of exports (stage=eval: scores, report) and the VADER/DDPO/DPO comparison report."""

import json
import math
import shutil

import lightning as L
import pytest

from lifecycle import outputs
from lifecycle.bench import compare
from lifecycle.data.video_io import decode_video
from lifecycle.errors import ConfigError

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["prompts.train=[a large red circle moving left quickly on a black background]",
           "prompts.test=[a small blue triangle moving up slowly on a gray background,"
           "a large green square moving right quickly on a black background]"]


def test_evaluate_scores_each_export_on_the_same_noise(tmp_path):
    from lifecycle.models import build_bundle
    from lifecycle.stages.eval import run

    cfg = compose_cfg(tmp_path / "build")
    for seed, name in ((0, "a"), (1, "b")):
        L.seed_everything(seed)
        build_bundle(cfg.model).save_pretrained(tmp_path / name / "export")
    shutil.copytree(tmp_path / "a" / "export", tmp_path / "a_copy")  # a bundle folder itself works too
    models = f"stage.models=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'a_copy'}]"
    out = tmp_path / "eval"
    cfg = compose_cfg(out, "stage=eval", models, "reward=[colour,vivid]", "stage.evaluation.num_steps=2", *PROMPTS)
    outputs.configure(cfg)  # as the CLI does
    try:
        result = run(cfg)
    finally:
        outputs.configure(None)
    assert list(result) == ["a", "b", "a_copy"]
    table = json.loads((out / "report" / "table.json").read_text())
    assert table["a"] == table["a_copy"]  # same weights, same prompts and noise: the same scores
    assert table["a"]["test"]["reward/vivid"] != table["b"]["test"]["reward/vivid"]
    assert {"reward/colour", "reward/vivid", "colour_accuracy"} <= set(table["b"]["test"])
    assert {"fid", "kid", "temporal_consistency", "motion"} <= set(table["b"]["test"])
    report = (out / "report" / "report.md").read_text()
    header = "| model | reward (weighted sum) ↑ | colour ↑ | vivid ↑ | FID ↓ | KID ↓ | temporal consistency ↑ | motion |"
    assert report.count(header) == 2  # one table per prompt set
    test_rows = report.split("## test prompts (2)")[1].split("\n\n")[1].splitlines()[2:]
    assert [r.split(" | ")[0] for r in test_rows] == ["| a", "| b", "| a_copy"]
    assert f"| {table['b']['test']['fid']:.3f} |" in test_rows[1]
    assert "No training logs found for a, b, a_copy" in report
    assert "<table>" in (out / "report" / "report.html").read_text()
    grid = decode_video((out / "report" / "grid_test.gif").read_bytes())  # 3 models x 2 prompts, 128 px cells, 8 frames
    assert grid.shape[0] == 8 and grid.shape[1] > 3 * 128 and grid.shape[2] > 2 * 128
    assert (out / "samples" / "b" / "test" / "001.mp4").stat().st_size > 0
    provenance = json.loads((out / "samples" / "b" / "test" / "provenance.json").read_text())
    assert provenance["stage"] == "eval" and provenance["model"]["pretrained"] == str(tmp_path / "b" / "export")

    with pytest.raises(ConfigError, match=r"stage.models\[1\]: no exported bundle"):
        compose_cfg(out, "stage=eval", f"stage.models=[{tmp_path / 'a'},{tmp_path / 'missing'}]")
    with pytest.raises(ConfigError, match="stage.models: list"):
        compose_cfg(out, "stage=eval", "stage.models=[]")


def test_compare_spends_the_same_reward_queries_on_each_method(tmp_path):
    plans = compare.plans("/m", seed=1, queries=480, out=tmp_path, prompts=24, extra=["reward=colour", "stage.steps=7"])

    def value(run, key):
        return next(o.split("=", 1)[1] for o in reversed(run) if o.startswith(key + "="))

    (vader,), (guarded,), (ddpo,), (prefs, dpo) = (plans[m] for m in ("VADER", "VADER + judge guard", "DDPO",
                                                                       "Diffusion-DPO"))
    (grpo,), (nft,) = plans["GRPO"], plans["NFT"]
    assert int(value(vader, "stage.batch_size")) * 120 == 480 and value(vader, "stage.steps") == "7"  # user wins
    assert int(value(ddpo, "stage.epochs")) * int(value(ddpo, "stage.sample.batch_size")) * 2 == 480
    assert int(value(prefs, "stage.repeats")) * int(value(prefs, "stage.candidates")) * 24 == 480
    for run in (grpo, nft):
        assert int(value(run, "stage.epochs")) * int(value(run, "stage.sample.batch_size")) * \
            int(value(run, "stage.sample.num_batches")) == 480
    assert value(dpo, "stage.pairs") == value(prefs, "stage.out")
    alignment = (vader, guarded, ddpo, dpo, grpo, nft)
    assert all(value(run, "reward") == "colour" and value(run, "seed") == "1" and value(run, "model.pretrained") == "/m"
               for run in (*alignment, prefs))
    assert not any(o.startswith("stage.steps") for o in prefs)  # stage keys reach the alignment stages only
    # every alignment run logs the judge without acting on it, but the guarded run stops on it
    assert all(value(run, "stage.judge") == "[colour_accuracy,direction_accuracy]" for run in alignment)
    assert [value(run, "stage.judge_guard.action") for run in alignment] == ["log", "stop", "log", "log", "log", "log"]
    assert len({value(run, "run_dir") for run in alignment}) == len(alignment)


def test_compare_report_has_table_one_and_both_plots(tmp_path):
    def run(before, after, queries, seconds):
        row = {"reward": 0.0, "colour_accuracy": 0.5, "direction_accuracy": 0.5}
        table = {tag: {s: {**row, "reward": value} for s in ("train", "test")}
                 for tag, value in (("before", before), ("after", after))}
        curve = [{"step": i, "reward_queries": q, "seconds": t, "reward": before + i * (after - before) / 2}
                 for i, (q, t) in enumerate(zip(queries, seconds))]
        return {"table": table, "curve": curve}

    results = {"VADER": {0: run(0.3, 0.5, [0, 4, 8], [0, 1, 2]), 1: run(0.3, 0.7, [0, 4, 8], [0, 1, 4])},
               "DDPO": {0: run(0.3, 0.3, [0, 4, 8], [0, 5, 9]), 1: run(0.3, 0.32, [0, 4, 8], [0, 5, 10])},
               "Diffusion-DPO": {0: run(0.3, 0.4, [8, 8, 8], [3, 4, 5]), 1: run(0.3, 0.4, [8, 8, 8], [3, 4, 6])}}
    guarded = run(0.3, 0.4, [0, 4, 8], [0, 1, 2])
    for point, judge in zip(guarded["curve"], (0.9, 0.95, 0.6)):
        point["judge"] = judge
    guarded["curve"][-1]["judge_guard"] = "tripped"
    guarded["judge"] = {"margin": 0.1, "best": {"step": 1, "judge": 0.95, "reward": 0.35},
                        "tripped": {"step": 2, "judge": 0.6, "reward": 0.4}}
    for seed in (0, 1):
        for point, judge in zip(results["VADER"][seed]["curve"], (0.9, 0.8, 0.5)):
            point["judge"] = judge
    results["VADER + judge guard"] = {0: guarded, 1: guarded}
    text = compare.report(results, "colour", 8, tmp_path, resolution={16: {"VADER": {"train": 0.1, "test": 0.05},
                                                                          "DDPO": {"train": 0.0, "test": -0.01}}})
    table_one = text.split("Ordering")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in table_one.splitlines() if line.startswith("| ")}
    assert rows["base"].startswith("| base | 0.3000 ± 0.0000 | 0.3000 ± 0.0000")
    assert rows["VADER"].startswith("| VADER | 0.6000 ± 0.1000 | 0.6000 ± 0.1000") and "| 8 | 3 ± 1 |" in rows["VADER"]
    assert "| 8 | 10 ± 0 |" in rows["DDPO"]
    assert "Ordering by held-out reward: VADER > Diffusion-DPO > VADER + judge guard > DDPO." in text
    # VADER's mean gain: ((0.5 - 0.3) + (0.7 - 0.3)) / 2 = 0.3. Level 25% (0.375): seed 0 (0.3, 0.4, 0.5 at 0, 4, 8 q;
    # 0, 1, 2 s) at 3/4 of its first interval: 3 q, 0.75 s; seed 1 (0.3, 0.5, 0.7; 0, 1, 4 s) at 3/8: 1.5 q, 0.375 s;
    # mean 2.25 q, 0.56 s. 50% (0.45): 6 q, 1.5 s and 3 q, 0.75 s. 75% (0.525): seed 1 only, 4.5 q, 1.375 s.
    assert "| 25% (+0.0750) | 50% (+0.1500) | 75% (+0.2250) |" in text
    assert "| VADER | 2 q, 1 s | 4 q, 1 s | 4 q, 1 s (1/2 seeds) |" in text  # 4.5 rounds to even
    assert "Judge guard (margin 0.1)" in text
    assert "| 1 | 0.950 (1) | 2 (0.4000, 0.600) | 0.7000, 0.500 | 0.500 / 0.500 (0.500 / 0.500) |" in text
    assert "| 16 px | +0.1000 / +0.0500 | +0.0000 / -0.0100 |" in text
    assert "| DDPO | not reached | not reached | not reached |" in text
    for name in ("reward_vs_queries.png", "reward_vs_seconds.png", "resolution_gain.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["DDPO"]["1"]["table"]["after"]["test"]["reward"] == 0.32


def test_report_curves_come_from_each_exports_run_log(tmp_path):
    from lifecycle.metrics.report import lineage_of, plot_curves, read_curves, render, run_dir_of

    run = tmp_path / "pretrain"
    (run / "export").mkdir(parents=True)
    (run / "export" / "lineage.json").write_text(json.dumps({"stage": "pretrain", "step": 4, "run_dir": str(run)}))
    (run / "metrics.csv").write_text("epoch,step,train/loss,val/fid\n0,0,0.9,\n0,1,0.5,\n0,2,0.4,3.5\n0,3,,2.0\n")
    assert run_dir_of(lineage_of(run / "export")) == run and run_dir_of(lineage_of(tmp_path)) is None
    curves = read_curves(run, ["train/loss", "val/fid", "train/reward"])
    assert curves == {"train/loss": [(0, 0.9), (1, 0.5), (2, 0.4)], "val/fid": [(2, 3.5), (3, 2.0)]}
    assert plot_curves({"pretrain": curves, "other": {}}, tmp_path) == ["curve_train_loss.png", "curve_val_fid.png"]
    assert (tmp_path / "curve_val_fid.png").stat().st_size > 0
    blocks = [("h2", "a <b>"), ("table", ["model", "FID ↓"], [["x&y", "1.000"]]), ("images", [("g.gif", "grid")])]
    assert render(blocks, "md") == "## a <b>\n\n| model | FID ↓ |\n|---|---|\n| x&y | 1.000 |\n\n![grid](g.gif)\n"
    page = render(blocks, "html")
    assert "<h2>a &lt;b&gt;</h2>" in page and "<td>x&amp;y</td>" in page and '<img src="g.gif" alt="grid">' in page


def test_grid_columns_are_labelled_with_their_prompts_wrapped_to_the_cell():
    import numpy as np
    from PIL import ImageFont

    from lifecycle.metrics.report import CELL, tile, wrap

    font = ImageFont.load_default()
    prompt = "a large red triangle moving left quickly on a black background"
    lines = wrap(prompt, font, CELL)
    assert len(lines) > 1 and " ".join(lines) == prompt.removeprefix("a ")  # it fits: every word kept
    assert all(font.getlength(line) <= CELL for line in lines)
    long = wrap("colour " * 60, font, CELL)
    assert len(long) == 4 and long[-1].endswith("...") and font.getlength(long[-1]) <= CELL
    black = np.zeros((2, 8, 8, 3), np.uint8)
    labelled, blank = (tile([[black, black]], ["model"], heads) for heads in ([prompt, "b"], ["", ""]))
    assert labelled.shape[1] > blank.shape[1]  # room for the wrapped lines above the clips
    header = labelled[0, : labelled.shape[1] - blank.shape[1]]
    assert (header < 100).any(axis=-1).sum() > 50  # text was drawn there


@pytest.mark.parametrize("model, frames", [("tiny_image", 1), ("tiny_svd", 8)])
def test_eval_takes_image_and_image_to_video_exports(tmp_path, model, frames):
    from lifecycle.models import build_bundle
    from lifecycle.stages.eval import run

    L.seed_everything(0)
    build_bundle(compose_cfg(tmp_path / "build", f"model={model}", tiny=False).model).save_pretrained(tmp_path / "m")
    cfg = compose_cfg(tmp_path / "eval", "stage=eval", f"stage.models=[{tmp_path / 'm'}]", f"stage.frames={frames}",
                      "stage.evaluation.num_steps=2", "metrics.reference.n=4", *PROMPTS, tiny=False)
    result = run(cfg)["m"]
    test = result["test"]
    assert test["n"] == 2 and math.isfinite(test["fid"])
    assert math.isnan(result["train"]["fid"]) == (frames == 1)  # one prompt of one frame: no FID
    if frames == 1:  # a still: nothing changes between frames
        assert test["temporal_consistency"] == 1.0 and test["motion"] == 0.0
    assert decode_video((tmp_path / "eval" / "report" / "grid_test.gif").read_bytes()).shape[0] == frames


def test_compare_runs_a_finished_run_only_when_its_overrides_changed(tmp_path, monkeypatch):
    calls = []

    def fake(overrides):
        calls.append(overrides)  # like stage=preferences, leaves no run directory
        return {"steps": len(calls)}

    monkeypatch.setattr(compare, "run_overrides", fake)
    plan = [["stage=preferences", f"run_dir={tmp_path / 'a'}"], ["stage=dpo", f"run_dir={tmp_path / 'b'}"]]
    assert compare.run_plan(plan) == {"steps": 2}
    assert compare.run_plan(plan) == {"steps": 2} and len(calls) == 2  # both finished: nothing runs, same result
    changed = [plan[0], ["stage=dpo", "stage.steps=5", f"run_dir={tmp_path / 'b'}"]]
    assert compare.run_plan(changed) == {"steps": 3} and calls[-1] == changed[1]
