"""Sweep summaries: result.json from each run, a multirun's job folders as one table (`python -m lifecycle.sweep`)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lifecycle.__main__ import write_result
from lifecycle.secrets import MARKER
from lifecycle.sweep import FAILED, cell, columns, flatten, footer, main, markdown, read_jobs, summarise, varying

from .helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


def job(root: Path, num: int, overrides: list[str], result: dict | None = None) -> None:
    """A job folder as Hydra and `python -m lifecycle` leave it (no result.json: failed or still running)."""
    (root / str(num) / ".hydra").mkdir(parents=True)
    (root / str(num) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if result is not None:
        (root / str(num) / "result.json").write_text(json.dumps(result))


@pytest.fixture
def sweep(tmp_path):
    """Four jobs over K x lr, job 2 without result.json; seed and stage the same in every job."""
    common = ["stage=vader", "seed=0"]
    job(tmp_path, 0, [*common, "stage.sampling.grad_steps=1", "stage.optimizer.lr=1e-3"],
        {"steps": 4, "fit_seconds": 12.25, "after": {"test": {"reward": 0.5}, "train": {"reward": 0.75}}})
    job(tmp_path, 1, [*common, "stage.sampling.grad_steps=1", "stage.optimizer.lr=3e-4"],
        {"steps": 4, "fit_seconds": 10.0, "after": {"test": {"reward": 0.25}, "train": {"reward": 0.5}}})
    job(tmp_path, 2, [*common, "stage.sampling.grad_steps=2", "stage.optimizer.lr=1e-3"])
    job(tmp_path, 10, [*common, "stage.sampling.grad_steps=2", "stage.optimizer.lr=3e-4"],
        {"steps": 4, "fit_seconds": 20.5, "after": {"test": {"reward": 0.875}, "train": {"reward": 1.0}}})
    (tmp_path / "multirun.yaml").write_text("{}")  # Hydra's record of the sweep: not a job
    return tmp_path


def test_write_result_is_json_beside_the_run_with_secrets_redacted(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "model": {"hub_token": "hf_abcdef123456"}})
    write_result({"steps": 2, "export": tmp_path / "export", "best": {"val/fid": 1.5}, "hub_token": "hf_abcdef123456",
                  "note": "pushed with hf_abcdef123456"}, cfg)
    assert os.listdir(tmp_path / "run") == ["result.json"]  # the temporary file was swapped in
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == {
        "steps": 2, "export": str(tmp_path / "export"), "best": {"val/fid": 1.5}, "hub_token": MARKER,
        "note": f"pushed with {MARKER}"}


def test_flatten_keeps_the_numbers_of_nested_dicts_under_slash_joined_keys():
    result = {"steps": 2, "fit_seconds": 1.5, "resumed": True, "export": "out/export", "sizes": [1, 2],
              "before/test/reward": 0.25, "best": {"path": "best.ckpt", "val/fid": 3.0}, "a": {"b": {"c": -1}}}
    assert flatten(result) == {"steps": 2, "fit_seconds": 1.5, "before/test/reward": 0.25, "best/val/fid": 3.0,
                               "a/b/c": -1}
    assert flatten(None) == flatten([1, 2]) == {}


def test_varying_keeps_overrides_that_differ_or_that_some_jobs_lack():
    jobs = [{"seed": "0", "lr": "1e-3", "k": "1"}, {"seed": "0", "lr": "3e-4", "k": "1"},
            {"seed": "0", "lr": "1e-3", "k": "1", "+extra": "x"}]
    assert varying(jobs) == ["lr", "+extra"]
    assert varying(jobs[:1]) == []


def test_table_has_a_row_per_job_and_counts_those_without_a_result(sweep):
    jobs = read_jobs(sweep)
    assert [j["job"] for j in jobs] == ["0", "1", "2", "10"]  # by number, multirun.yaml skipped
    header, rows = summarise(jobs)
    assert header == ["job", "status", "stage.sampling.grad_steps", "stage.optimizer.lr",
                      "steps", "fit_seconds", "after/test/reward", "after/train/reward"]
    assert rows[0] == ["0", "done", "1", "1e-3", 4, 12.25, 0.5, 0.75]
    assert rows[2] == ["2", FAILED, "2", "1e-3", None, None, None, None]
    table = markdown(header, rows)
    assert table.splitlines()[2] == "| 0   | done              | 1                         | 1e-3               " \
                                    "|     4 |       12.25 |               0.5 |               0.75 |"
    assert "| 2   | failed/unfinished | 2 " in table and table.count("\n") == 5
    assert footer(jobs) == "4 jobs, 3 done, 1 failed/unfinished (no result.json; see each job's *.log): 2"


def test_sort_orders_by_a_result_or_override_key_with_missing_values_last(sweep):
    jobs = read_jobs(sweep)
    by_reward = summarise(jobs, sort="after/test/reward", desc=True)[1]
    assert [r[0] for r in by_reward] == ["10", "0", "1", "2"]
    assert [r[0] for r in summarise(jobs, sort="after/test/reward")[1]] == ["1", "0", "10", "2"]
    by_lr = summarise(jobs, sort="stage.optimizer.lr")[1]  # as numbers: 3e-4 before 1e-3
    assert [r[0] for r in by_lr] == ["1", "10", "0", "2"]
    assert [r[0] for r in summarise(jobs, desc=True)[1]] == ["10", "2", "1", "0"]
    with pytest.raises(SystemExit, match="--sort after/reward: no job has this key; known: job, stage, seed, stage.s"):
        summarise(jobs, sort="after/reward")


def test_keys_are_globs_over_whole_result_keys(sweep):
    results = [j["result"] for j in read_jobs(sweep)]
    assert columns(results, ["*/reward"]) == ["after/test/reward", "after/train/reward"]
    assert columns(results, ["after/test/reward", "steps", "*test*"]) == ["after/test/reward", "steps"]
    with pytest.raises(SystemExit, match="--keys reward: matches no result key; known: steps, fit_seconds"):
        columns(results, ["reward"])  # a plain key matches itself only
    assert columns([{}, {}], ["reward"]) == []  # no job has finished yet: nothing to check the keys against


def test_cells_round_floats_to_four_significant_digits():
    assert [cell(v) for v in (0.123456, 123.456, 12345.6, 2.0, 3e-5, 7, None, float("nan"), "a|b")] == \
        ["0.1235", "123.5", "12346", "2", "3e-05", "7", "-", "nan", r"a\|b"]


def test_errors_name_the_directory(tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path / 'nope'}: no such directory"):
        read_jobs(tmp_path / "nope")
    (tmp_path / "outputs").mkdir()
    with pytest.raises(SystemExit, match=f"{tmp_path}: no job folders"):
        read_jobs(tmp_path)


def test_command_prints_the_table_and_writes_summary_md_and_csv(sweep, capsys):
    main([str(sweep), "--sort", "after/test/reward", "--desc", "--keys", "*/test/*", "steps"])
    printed = capsys.readouterr().out
    assert printed == (sweep / "summary.md").read_text()
    assert printed.splitlines()[0].split("|")[1:-1] == [
        " job ", " status            ", " stage.sampling.grad_steps ", " stage.optimizer.lr ",
        " after/test/reward ", " steps "]
    assert printed.endswith("\n\n4 jobs, 3 done, 1 failed/unfinished (no result.json; see each job's *.log): 2\n")
    with open(sweep / "summary.csv") as f:
        assert list(csv.reader(f)) == [
            ["job", "status", "stage.sampling.grad_steps", "stage.optimizer.lr", "after/test/reward", "steps"],
            ["10", "done", "2", "3e-4", "0.875", "4"], ["0", "done", "1", "1e-3", "0.5", "4"],
            ["1", "done", "1", "3e-4", "0.25", "4"], ["2", FAILED, "2", "1e-3", "", ""]]


def test_a_real_multirun_is_summarised(tmp_path, synthetic_shards):
    """Two tiny pre-training runs over the learning rate, then `python -m lifecycle.sweep` on their folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run = subprocess.run(
        [sys.executable, "-m", "lifecycle", "-m", "stage=pretrain", *TINY, f"data.shards={synthetic_shards}",
         "data.generate=null", "data.num_workers=0", "trainer.enable_progress_bar=false",
         "stage.curriculum=[{name: a, resolution: 16, frames: 8, batch_size: 4, steps: 2}]",
         "stage.validation.prompts.n=2", "stage.validation.num_steps=2", "stage.validation.metrics=false",
         "stage.validation.best=null",
         "stage.optimizer.lr=1e-3,2e-3",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "sweep" / "0" / "result.json").read_text())["steps"] == 2

    summary = subprocess.run([sys.executable, "-m", "lifecycle.sweep", str(tmp_path / "sweep"),
                              "--sort", "stage.optimizer.lr", "--desc"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    lines = summary.stdout.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:5]] == ["job", "status", "stage.optimizer.lr", "steps"]
    assert [line.split("|")[3].strip() for line in lines[2:4]] == ["0.002", "0.001"]
    assert lines[-1] == "2 jobs, 2 done" and (tmp_path / "sweep" / "summary.csv").is_file()
