"""Side-by-side evaluation of exports (stage=evaluate) and the VADER/DDPO/DPO comparison report."""

import json
import shutil

import lightning as L
import pytest

from lifecycle import outputs
from lifecycle.bench import compare
from lifecycle.config import ConfigError

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["prompts.train=[a large red circle moving left quickly on a black background]",
           "prompts.test=[a small blue triangle moving up slowly on a gray background,"
           "a large green square moving right quickly on a black background]"]


def test_evaluate_scores_each_export_on_the_same_noise(tmp_path):
    from lifecycle.models import build_bundle
    from lifecycle.stages.evaluate import run

    cfg = compose_cfg(tmp_path / "build")
    for seed, name in ((0, "a"), (1, "b")):
        L.seed_everything(seed)
        build_bundle(cfg.model).save_pretrained(tmp_path / name / "export")
    shutil.copytree(tmp_path / "a" / "export", tmp_path / "a_copy")  # a bundle folder itself works too
    models = f"stage.models=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'a_copy'}]"
    out = tmp_path / "eval"
    cfg = compose_cfg(out, "stage=evaluate", models, "reward=[colour,vivid]", "stage.evaluation.num_steps=2", *PROMPTS)
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
    lines = (out / "report" / "table.md").read_text().splitlines()
    assert lines[0].startswith("| model | colour (train) | colour (test) | vivid (train)")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| a", "| b", "| a_copy"]
    assert (out / "samples" / "b" / "test" / "001.mp4").stat().st_size > 0
    provenance = json.loads((out / "samples" / "b" / "test" / "provenance.json").read_text())
    assert provenance["stage"] == "evaluate" and provenance["model"]["pretrained"] == str(tmp_path / "b" / "export")

    with pytest.raises(ConfigError, match=r"stage.models\[1\]: no exported bundle"):
        compose_cfg(out, "stage=evaluate", f"stage.models=[{tmp_path / 'a'},{tmp_path / 'missing'}]")
    with pytest.raises(ConfigError, match="stage.models: list"):
        compose_cfg(out, "stage=evaluate", "stage.models=[]")


def test_compare_spends_the_same_reward_queries_on_each_method(tmp_path):
    plans = compare.plans("/m", seed=1, queries=480, out=tmp_path, prompts=24, extra=["reward=colour", "stage.steps=7"])

    def value(run, key):
        return next(o.split("=", 1)[1] for o in reversed(run) if o.startswith(key + "="))

    (vader,), (ddpo,), (prefs, dpo) = plans["VADER"], plans["DDPO"], plans["Diffusion-DPO"]
    assert int(value(vader, "stage.batch_size")) * 120 == 480 and value(vader, "stage.steps") == "7"  # user wins
    assert int(value(ddpo, "stage.epochs")) * int(value(ddpo, "stage.sample.batch_size")) * 2 == 480
    assert int(value(prefs, "stage.repeats")) * int(value(prefs, "stage.candidates")) * 24 == 480
    assert value(dpo, "stage.pairs") == value(prefs, "stage.out")
    assert all(value(run, "reward") == "colour" and value(run, "seed") == "1" and value(run, "model.pretrained") == "/m"
               for run in (vader, ddpo, prefs, dpo))
    assert not any(o.startswith("stage.steps") for o in prefs)  # stage keys reach the alignment stages only


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
    text = compare.report(results, "colour", 8, tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["base"].startswith("| base | 0.3000 ± 0.0000 | 0.3000 ± 0.0000")
    assert rows["VADER"].startswith("| VADER | 0.6000 ± 0.1000 | 0.6000 ± 0.1000") and "| 8 | 3 ± 1 |" in rows["VADER"]
    assert "| 8 | 10 ± 0 |" in rows["DDPO"]
    assert "Ordering by held-out reward: VADER > Diffusion-DPO > DDPO." in text
    for name in ("reward_vs_queries.png", "reward_vs_seconds.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["DDPO"]["1"]["table"]["after"]["test"]["reward"] == 0.32
