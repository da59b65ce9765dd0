"""The lines a run ends with: a row per stage with its headline figure, and the report's path."""

from lifecycle.summary import headline, summary


def test_each_kind_of_result_gets_its_headline():
    assert headline({"inputs": 224, "kept": 199, "shards": 4, "dropped": {"corrupt": 3}}) == \
        "199/224 clips kept in 4 shards"
    assert headline({"steps": 1250, "fid": 0.98, "colour_accuracy": 1.0, "direction_accuracy": 0.9167}) == \
        "1250 steps, FID 0.980, colour 100%, direction 92%"
    assert headline({"pairs": 473, "ties": 103}) == "473 preference pairs (103 ties dropped)"
    assert headline({"before/accuracy": 0.56, "after/accuracy": 0.85}) == "held-out pair accuracy 56% -> 85%"
    assert headline({"before/train/reward": 0.1, "before/test/reward": 0.2, "after/train/reward": 0.3,
                     "after/test/reward": 0.25}) == "held-out reward 0.2000 -> 0.2500 (training prompts 0.1000 -> 0.3000)"
    scores = {"pretrain": {"train": {"reward": 0.3}, "test": {"reward": 0.22}},
              "vader": {"train": {"reward": 0.4}, "test": {"reward": 0.24}}}
    assert headline({**scores, "seconds": 9.0}) == "2 models compared; best held-out reward: vader (0.2400)"


def test_a_recipe_ends_with_a_short_table_and_the_reports_path(tmp_path):
    (tmp_path / "eval" / "report").mkdir(parents=True)
    (tmp_path / "eval" / "report" / "report.md").write_text("# Evaluation\n")
    result = {"recipe": "tiny", "stages": {"pretrain": {"steps": 8, "fid": 2.5, "seconds": 30.2},
                                           "eval": {"m": {"test": {"reward": 0.5}}, "seconds": 12.0}}}
    lines = summary(result, tmp_path, "tiny").splitlines()
    assert lines[0].split() == ["stage", "seconds", "result"]
    assert lines[1].split() == ["pretrain", "30", "8", "steps,", "FID", "2.500"]
    assert lines[2].startswith("eval ") and lines[2].endswith("best held-out reward: m (0.5000)")
    assert lines[3:] == [f"report: {tmp_path / 'eval' / 'report' / 'report.md'}", f"all results: {tmp_path / 'recipe.json'}"]
    assert max(map(len, lines)) < 120  # not the whole result on one line
    # stage=curate run alone reports seconds per step
    alone = summary({"inputs": 10, "kept": 9, "shards": 1, "seconds": {"inspect": 1.5, "write": 2.0}}, tmp_path, "curate")
    assert alone.splitlines()[1].split() == ["curate", "4", "9/10", "clips", "kept", "in", "1", "shards"]
