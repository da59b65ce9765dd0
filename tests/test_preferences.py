"""Preference pairs: the shard format, the resumable training stream, Pick-a-Pic import, the preferences stage."""

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lifecycle.errors import ConfigError
from lifecycle.data.preferences import (
    PairStream, held_out, load_pickapic, pair_batches, read_manifest, read_pairs, write_pairs,
)
from lifecycle.data.shards import list_shards
from lifecycle.rewards.synthetic import ColourReward
from lifecycle.stages.preferences import choose_pairs

from .helpers import compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a large red circle moving left quickly on a black background",
           "a small blue square moving up slowly on a gray background",
           "a large green circle moving right quickly on a silver background"]


def toy_pairs(n, frames=2, size=8):
    """Pairs whose prompt names their index and whose pixels encode it (chosen = i, rejected = 255 - i)."""
    for i in range(n):
        yield {"prompt": f"pair {i}", "chosen": np.full((frames, size, size, 3), i, np.uint8),
               "rejected": np.full((frames, size, size, 3), 255 - i, np.uint8), "chosen_score": float(i),
               "rejected_score": -float(i), "scores": [float(i), -float(i)]}


def test_pairs_round_trip_with_manifest_and_corrupt_samples_skipped(tmp_path):
    out = tmp_path / "pairs"
    shards = write_pairs(out, toy_pairs(10), shard_size=4, manifest={"reward": "toy", "ties": 3})
    assert [os.path.basename(s) for s in shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    manifest = read_manifest(out)
    assert manifest == {"pairs": 10, "frames": 2, "resolution": 8, "source": "sampled", "reward": "toy", "ties": 3,
                        "shards": ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]}
    pairs = list(read_pairs(out))
    assert [p["prompt"] for p in pairs] == [f"pair {i}" for i in range(10)]
    assert pairs[7]["chosen"].dtype == np.uint8 and pairs[7]["chosen"].shape == (2, 8, 8, 3)
    assert int(pairs[7]["chosen"][0, 0, 0, 0]) == 7 and int(pairs[7]["rejected"][0, 0, 0, 0]) == 248
    assert (pairs[7]["chosen_score"], pairs[7]["rejected_score"], pairs[7]["scores"]) == (7.0, -7.0, [7.0, -7.0])
    with pytest.raises(FileExistsError):
        write_pairs(out, toy_pairs(1))

    with wds.TarWriter(str(out / "pairs-000003.tar")) as sink:  # one undecodable and one incomplete pair
        sink.write({"__key__": "00000010", "json": {"prompt": "x"}, "chosen.npy": b"junk", "rejected.npy": b"junk"})
        sink.write({"__key__": "00000011", "json": {"prompt": "y"}, "chosen.npy": b"junk"})
    reader = read_pairs(out)
    assert len(list(reader)) == 10 and reader.skipped == 2


def test_writing_refuses_bad_pairs_and_leaves_no_folder(tmp_path):
    bad = {"prompt": "p", "chosen": np.zeros((1, 4, 4, 3), np.float32), "rejected": np.zeros((1, 4, 4, 3), np.uint8)}
    with pytest.raises(ValueError, match="uint8"):
        write_pairs(tmp_path / "bad", [bad])
    small, large = (np.zeros((1, n, n, 3), np.uint8) for n in (4, 8))
    with pytest.raises(ValueError, match="expected the first pair's"):
        write_pairs(tmp_path / "mixed", [{"prompt": "p", "chosen": small, "rejected": small},
                                         {"prompt": "q", "chosen": large, "rejected": large}])
    with pytest.raises(ValueError, match="no pairs"):
        write_pairs(tmp_path / "empty", [])
    assert sorted(os.listdir(tmp_path)) == []  # neither the folder nor its staging copy is left


def test_split_is_a_fixed_function_of_the_key():
    keys = [f"{i:08d}" for i in range(2000)]
    val = [k for k in keys if held_out(k, 0.2)]
    assert 0.17 < len(val) / len(keys) < 0.23
    assert val == [k for k in keys if held_out(k, 0.2)]
    assert set(val) <= {k for k in keys if held_out(k, 0.5)}  # a larger fraction holds out a superset
    assert not any(held_out(k, 0.0) for k in keys)


def test_pair_stream_is_deterministic_resumable_split_by_rank_and_never_shows_held_out_pairs(tmp_path):
    out = tmp_path / "pairs"
    write_pairs(out, toy_pairs(40), shard_size=8)
    urls = list_shards(str(out))
    val = {p["prompt"] for p in read_pairs(out, split="val", val_fraction=0.25)}
    train = {p["prompt"] for p in read_pairs(out, split="train", val_fraction=0.25)}
    assert val and train and not val & train and len(val | train) == 40

    def batches(start=0, rank=0, world_size=1, n=6, seed=0):
        stream = iter(PairStream(urls, 4, 1, 4, seed=seed, start_batch=start, shuffle_buffer=16, rank=rank,
                                 world_size=world_size, val_fraction=0.25))
        return [next(stream) for _ in range(n)]

    straight = batches()
    first = straight[0]
    assert first["chosen"].shape == (4, 1, 3, 4, 4) and first["chosen"].dtype == torch.float32
    for batch in straight:  # pixels still encode the prompt's index: chosen and rejected stay paired
        index = torch.tensor([int(p.split()[1]) for p in batch["prompts"]], dtype=torch.float32)
        torch.testing.assert_close(batch["chosen"][:, 0, 0, 0, 0] * 255, index)
        torch.testing.assert_close(batch["rejected"][:, 0, 0, 0, 0] * 255, 255 - index)
    seen = [p for b in straight for p in b["prompts"]]
    assert not set(seen) & val and len(set(seen)) > 12
    assert [b["prompts"] for b in batches(start=3, n=3)] == [b["prompts"] for b in straight[3:]]
    assert batches(seed=1)[0]["prompts"] != first["prompts"]
    rank0, rank1 = batches(rank=0, world_size=2, n=3), batches(rank=1, world_size=2, n=3)
    assert not {p for b in rank0 for p in b["prompts"]} & {p for b in rank1 for p in b["prompts"]}

    ordered = list(pair_batches(out, 7, 1, 4, split="val", val_fraction=0.25))
    assert [p for b in ordered for p in b["prompts"]] == sorted(val, key=lambda p: int(p.split()[1]))


def test_choose_pairs_best_worst_all_and_ties():
    assert choose_pairs([0.2, 0.9, 0.1, 0.5], "best_worst", 0.05) == ([(1, 2)], 0)
    assert choose_pairs([0.5, 0.52, 0.49], "best_worst", 0.05) == ([], 1)
    assert choose_pairs([0.3, 0.3], "best_worst", 0.0) == ([], 1)  # equal scores are a tie at any margin
    pairs, ties = choose_pairs([0.1, 0.5, 0.52], "all", 0.05)
    assert sorted(pairs) == [(1, 0), (2, 0)] and ties == 1


def png(colour, size=(12, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pickapic(tmp_path):
    """Five Pick-a-Pic-style rows: image 1 preferred (base64), image 0 preferred (file paths), a tie, two bad rows."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "img" / "blue.png").write_bytes(png((0, 0, 255)))
    b64 = {c: base64.b64encode(png(c)).decode() for c in [(0, 255, 0), (255, 255, 0)]}
    rows = [
        {"caption": "a yellow image", "jpg_0": b64[(0, 255, 0)], "jpg_1": b64[(255, 255, 0)],
         "label_0": 0, "label_1": 1},
        {"caption": "a red image", "jpg_0": "img/red.png", "jpg_1": str(tmp_path / "img" / "blue.png"),
         "label_0": 1.0, "label_1": 0.0},
        {"caption": "either", "jpg_0": "img/red.png", "jpg_1": "img/blue.png", "label_0": 0.5, "label_1": 0.5},
        {"caption": "broken", "jpg_0": "not base64!", "jpg_1": "img/blue.png", "label_0": 1, "label_1": 0},
        {"caption": "no labels", "jpg_0": "img/red.png", "jpg_1": "img/blue.png"},
    ]
    path = tmp_path / "pickapic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pickapic_rows_become_image_pairs_with_ties_and_bad_rows_counted(pickapic):
    stats = {}
    pairs = list(load_pickapic(pickapic, resolution=8, stats=stats))
    assert stats == {"ties": 1, "corrupt": 2}
    assert [p["prompt"] for p in pairs] == ["a yellow image", "a red image"]
    chosen = [p["chosen"][0, 4, 4].tolist() for p in pairs]
    rejected = [p["rejected"][0, 4, 4].tolist() for p in pairs]
    assert chosen == [[255, 255, 0], [255, 0, 0]] and rejected == [[0, 255, 0], [0, 0, 255]]
    assert pairs[0]["chosen"].shape == (1, 8, 8, 3) and pairs[0]["source"] == "pickapic"
    with pytest.raises(ValueError, match="jsonl"):
        next(load_pickapic(pickapic.with_suffix(".parquet"), resolution=8))


def test_pickapic_conversion_stage(tmp_path, pickapic):
    from lifecycle.stages.preferences import run

    cfg = compose_cfg(tmp_path, "stage=preferences", "stage.source=pickapic", f"stage.path={pickapic}",
                      "stage.resolution=16")
    assert run(cfg) == {"pairs": 2, "ties": 1, "corrupt": 2, "out": str(tmp_path / "pairs")}
    manifest = read_manifest(tmp_path / "pairs")
    assert (manifest["pairs"], manifest["frames"], manifest["resolution"], manifest["source"]) == (2, 1, 16, "pickapic")
    assert (manifest["ties"], manifest["reward"]) == (1, None)
    with pytest.raises(ConfigError, match="stage.path"):
        compose_cfg(tmp_path, "stage=preferences", "stage.source=pickapic", f"stage.path={tmp_path}/none.jsonl")


def mean_red(videos, prompts):
    """An annotator: prefers red."""
    return videos[:, :, 0].mean(dim=(1, 2, 3))


def test_preferences_stage_samples_scores_and_pairs(tmp_path):
    from lifecycle.stages.preferences import run

    fast = ["stage=preferences", "stage.candidates=3", "stage.repeats=2", "stage.num_steps=2", "stage.batch_size=6",
            f"prompts.train=[{','.join(PROMPTS)}]", "reward=colour", "stage.min_margin=0.001", "stage.strategy=all",
            "stage.shard_size=5"]
    cfg = compose_cfg(tmp_path, *fast)
    result = run(cfg)
    out = tmp_path / "pairs"
    manifest = read_manifest(out)
    jobs = len(PROMPTS) * 2
    assert result == {"pairs": manifest["pairs"], "ties": manifest["ties"], "out": str(out)}
    assert manifest["pairs"] + manifest["ties"] == jobs * 3  # 3 candidates: 3 comparisons per prompt and repeat
    assert (manifest["frames"], manifest["resolution"], manifest["source"]) == (8, 32, "sampled")
    assert (manifest["candidates"], manifest["repeats"], manifest["strategy"]) == (3, 2, "all")
    assert manifest["reward"]["colour"]["_target_"] == "lifecycle.rewards.synthetic.ColourReward"
    pairs = list(read_pairs(out))
    assert len(pairs) == manifest["pairs"] >= 10
    reward = ColourReward()
    for p in pairs:
        assert p["prompt"] in PROMPTS and len(p["scores"]) == 3
        assert p["chosen_score"] >= p["rejected_score"] + 0.001
        assert {p["chosen_score"], p["rejected_score"]} <= set(p["scores"])
        stored = torch.from_numpy(np.stack([p["chosen"], p["rejected"]])).permute(0, 1, 4, 2, 3).float() / 255
        rescored = reward(stored, [p["prompt"]] * 2)  # the stored clips are the scored ones (up to 8-bit rounding)
        torch.testing.assert_close(rescored, torch.tensor([p["chosen_score"], p["rejected_score"]]), atol=0.02, rtol=0)
    # each candidate, in each (repeat, prompt), draws its own noise: no two candidates or candidate sets are alike
    sets = {tuple(p["scores"]) for p in pairs}
    assert all(len(set(scores)) == 3 for scores in sets)
    assert jobs - manifest["ties"] // 3 <= len(sets) <= jobs  # a job pairs nothing only when all 3 comparisons tie

    stamp = os.stat(out / "dataset.json").st_mtime_ns
    again = run(cfg)  # a complete folder is kept: nothing is sampled
    assert again["reused"] and again["pairs"] == manifest["pairs"]
    assert os.stat(out / "dataset.json").st_mtime_ns == stamp

    annotated = tmp_path / "annotated"
    cfg = compose_cfg(annotated, *fast, "stage.repeats=1", "stage.strategy=best_worst",
                      "stage.annotator=tests.test_preferences.mean_red")
    run(cfg)
    manifest = read_manifest(annotated / "pairs")
    assert manifest["reward"] == "tests.test_preferences.mean_red" and manifest["pairs"] + manifest["ties"] == 3
    for p in read_pairs(annotated / "pairs"):
        assert p["chosen_score"] == max(p["scores"]) and p["rejected_score"] == min(p["scores"])
        assert p["chosen"][..., 0].mean() > p["rejected"][..., 0].mean()


@pytest.mark.parametrize("override, key", [
    ("stage.candidates=1", "stage.candidates"),
    ("stage.strategy=random", "stage.strategy"),
    ("stage.source=web", "stage.source"),
    ("stage.annotator=tests.no_such_module.judge", "stage.annotator"),
    ("stage.min_margin=-1", "stage.min_margin"),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        compose_cfg(tmp_path, "stage=preferences", override)
