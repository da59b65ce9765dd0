"""The data engine: each step on hand-made inputs, then `stage=curate` on a small raw world (a local Ray of two
workers and of one, re-runs, a safety filter, model steps), and its shards read back by the training stream."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.curation.annotate import annotate, describe_motion, frame_difference, global_shift
from lifecycle.curation.curate import WORK, deduplicate, run
from lifecycle.curation.dedup import find_duplicates, near_pairs, thumbnail_embedding
from lifecycle.curation.engine import SOCKET_PATH_ROOM, session_folder
from lifecycle.curation.media import list_units
from lifecycle.curation.filters import size_filter
from lifecycle.curation.media import decode
from lifecycle.data.curriculum import Curriculum
from lifecycle.data.raw_world import write_raw
from lifecycle.data.shards import CurriculumStream, list_shards
from lifecycle.data.synthetic import render_clip, sample_metadata
from lifecycle.data.video_io import encode_video

from .helpers import compose_cfg
from .test_curation_models import blip_folder, clip_folder, vit_folder


def clip(direction="left", colour="red", seed=0):
    return render_clip(sample_metadata(np.random.default_rng(seed), direction=direction, colour=colour, speed="quickly"))


# -- steps ------------------------------------------------------------------------------------------------
def test_frame_difference_by_hand():
    video = np.zeros((3, 2, 2, 3), np.uint8)
    video[1] = 255  # luma 0 -> 1 -> 0: two changes of 1 on every pixel
    assert frame_difference(video) == pytest.approx(1.0, abs=1e-6)
    video[2] = 51  # 0 -> 1 -> 0.2: mean |diff| = (1 + 0.8) / 2
    assert frame_difference(video) == pytest.approx(0.9, abs=1e-5)
    assert frame_difference(video[:1]) == 0.0


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_object_motion_direction(direction):
    ann = annotate(clip(direction))
    assert ann["motion"] == "object" and ann["direction"] == direction
    assert ann["travel"] == pytest.approx(0.6, abs=0.05)  # "quickly": 0.6 of the frame over the clip
    assert describe_motion(ann) == f"moving {direction}"


def test_static_shot_and_camera_pan():
    texture = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert annotate(np.stack([texture] * 8))["motion"] == "static"
    assert describe_motion(annotate(np.stack([texture] * 8))) == "a static shot"
    scene_left = np.stack([np.roll(texture, -2 * t, axis=1) for t in range(8)])  # the scene moves left ...
    ann = annotate(scene_left)
    assert ann == {"motion": "panning", "direction": "right", "travel": pytest.approx(14 * 2 / 40 / 2)}  # ... camera right
    assert global_shift(scene_left[0].mean(-1), scene_left[1].mean(-1)) == (-2, 0)
    scene_down = np.stack([np.roll(texture, 3 * t, axis=0) for t in range(8)])
    assert annotate(scene_down)["direction"] == "up"


def test_size_filter_reasons():
    video = np.zeros((8, 32, 48, 3), np.uint8)
    assert size_filter(video, min_resolution=32, min_frames=4, max_aspect=2.0) is None
    assert size_filter(video, min_resolution=40) == "resolution: 48x32, under 40 px"
    assert size_filter(video, min_frames=9) == "frames: 8, under 9"
    assert size_filter(video, max_frames=4) == "frames: 8, over 4"
    assert size_filter(video, max_aspect=1.4) == "aspect: 1.50, over 1.4"


def test_decode_rejects_broken_media_and_reads_images():
    video = clip()
    for fmt in ("mp4", "webm", "gif"):
        assert decode(encode_video(video, fmt), fmt).shape == (8, 32, 32, 3)
    mp4, gif = encode_video(video, "mp4"), encode_video(video, "gif")
    for data, ext, why in [(b"", "mp4", "empty"), (mp4[: len(mp4) // 3], "mp4", "unreadable"),
                           (os.urandom(2048), "webm", "unreadable"), (gif[: len(gif) // 2], "gif", "truncated")]:
        with pytest.raises(ValueError, match=why):
            decode(data, ext)
    from PIL import Image
    import io
    buffer = io.BytesIO()
    Image.fromarray(video[0]).save(buffer, format="PNG")
    np.testing.assert_array_equal(decode(buffer.getvalue(), "png"), video[:1])


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_find_duplicates_keeps_the_first_of_each_group(index):
    emb = np.zeros((5, 4), np.float32)
    emb[1] = [0.1, 0, 0, 0]  # RMS distance to 0: 0.05
    emb[2] = [0.2, 0, 0, 0]  # 0.05 from 1 (dropped), 0.1 from 0: kept at threshold 0.06
    emb[3] = [9, 9, 9, 9]  # an exact copy of 0 (same hash): its embedding is not looked at
    emb[4] = [0.02, 0, 0, 0]  # 0.01 from 0
    out = find_duplicates(["a", "b", "c", "a", "e"], emb, threshold=0.06, index=index)
    assert out[0] is None and out[2] is None
    assert out[1] == (0, "near", pytest.approx(0.05)) and out[3] == (0, "exact", 0.0)
    assert out[4] == (0, "near", pytest.approx(0.01))
    assert find_duplicates(["a", "b", "c", "a", "e"], emb, threshold=-1) == [None, None, None, (0, "exact", 0.0), None]


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_finds_the_exact_pairs(index):
    """Planted copies (small noise) among 6000 clustered vectors: the approximate index finds what the flat one finds."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32)).astype(np.float32)
    emb = centres[rng.integers(0, 60, 6000)] + rng.normal(scale=0.5, size=(6000, 32)).astype(np.float32)
    copies = rng.choice(5000, 300, replace=False)
    emb[5000 + np.arange(300)] = emb[copies] + rng.normal(scale=0.01, size=(300, 32)).astype(np.float32)
    exact = near_pairs(emb, 0.05, index="flat")
    assert set(exact) >= set(range(5000, 5300))
    found = near_pairs(emb, 0.05, index=index, exact_up_to=0, nprobe=8)
    assert found.keys() <= exact.keys() and len(found) >= 0.95 * len(exact)


def test_ray_sessions_under_long_folders_go_to_a_temp_folder():
    # the folder pytest-xdist gives a curation run: Ray's plasma socket under it would take 110 of 107 bytes
    xdist = Path("/tmp/pytest-of-root/pytest-144/popen-gw0/curated0/ray")
    assert session_folder(xdist) is None
    assert session_folder(Path("/work/out/curate/ray")) == Path("/work/out/curate/ray")
    longest = Path("/" + "x" * (SOCKET_PATH_ROOM - 1))
    assert session_folder(longest) == longest
    assert len(str(longest) + "/session_2026-12-04_21-31-04_899384_1709/sockets/plasma_store") <= 107


def test_thumbnail_embedding_ignores_brightness_not_colour():
    video = clip(colour="red")
    brighter = np.clip(video.astype(int) + 6, 0, 255).astype(np.uint8)

    def rms(a, b):
        return float(np.sqrt(((thumbnail_embedding(a) - thumbnail_embedding(b)) ** 2).mean()))
    assert rms(video, brighter) < 0.005  # only the clipped (saturated) channel differs
    assert rms(video, clip(colour="blue")) > 0.05


# -- the stage on a raw world ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "raw"
    write_raw(out, num_clips=160, labelled=0.5, exact_duplicates=0.05, near_duplicates=0.05, corrupt=0.05,
              rejects=0.05, progress=False)
    return out


def curate_args(raw: Path, out: Path, *more: str) -> list[str]:
    return ["stage=curate", f"stage.input={raw / 'media'}", f"stage.out={out}", f"stage.truth={raw / 'truth.jsonl'}",
            f"stage.recaption.labels={raw / 'labels.jsonl'}", "stage.generate=null", "stage.unit_size=48", *more]


@pytest.fixture(scope="module")
def curated(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "shards"
    summary = run(compose_cfg(out.parent, *curate_args(raw, out, "stage.workers=2")))
    return out, summary


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_curation_catches_what_was_planted(raw, curated):
    out, summary = curated
    truth = summary["truth"]
    files = sorted(p.name for p in (raw / "media").iterdir() if p.suffix != ".txt")
    assert sorted(r["source"] for r in manifest(out)) == files  # one row per input
    for kind in ("exact_duplicates", "corrupt", "filter_rejects"):
        assert truth[kind]["caught"] == truth[kind]["planted"] == 8, kind
    assert truth["near_duplicates"]["caught"] >= 7
    assert truth["caption_accuracy"]["overall"] >= 0.9 and truth["caption_accuracy"]["clips"] == summary["kept"]
    assert truth["original_caption_accuracy"]["overall"] < 0.1
    assert summary["kept"] + sum(summary["dropped"].values()) == summary["inputs"] == len(files)
    for name in ("report.md", "examples.png", "hist_aesthetic.png", "hist_motion.png", "annotations.png", "curate.json"):
        assert (out / name).is_file(), name


def test_curated_shards_train(curated):
    """Pre-training reads the shards: new captions by default, the originals with data.caption_key."""
    out, summary = curated
    phases = Curriculum([{"name": "a", "resolution": 16, "frames": 4, "batch_size": 8, "steps": 4}])
    new = next(iter(CurriculumStream(list_shards(str(out)), phases, shuffle_buffer=4)))
    old = next(iter(CurriculumStream(list_shards(str(out)), phases, shuffle_buffer=4, caption_key="original_caption")))
    assert new["video"].shape == (8, 4, 3, 16, 16) and torch.equal(new["video"], old["video"])
    assert all(" moving " in c and c.endswith(" background") for c in new["caption"])
    assert new["caption"] != old["caption"]
    row = next(r for r in manifest(out) if r["kept"])
    assert {"caption", "original_caption", "aesthetic", "vivid", "motion", "annotation", "colour", "shard"} <= set(row)


def test_one_worker_writes_what_two_write_and_reruns_skip_finished_work(raw, curated, tmp_path):
    out, _ = curated
    one = tmp_path / "one"
    run(compose_cfg(tmp_path, *curate_args(raw, one, "stage.workers=1")))
    assert manifest(one) == manifest(out)
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert shards == sorted(p.name for p in one.glob("*.tar")) and len(shards) == 4
    for name in shards:
        assert (one / name).read_bytes() == (out / name).read_bytes()
    assert list((tmp_path / "ray" / "logs").glob("raylet*"))  # the local Ray's logs end up in the run directory

    # an interrupted run: one unit unfinished, no curate.json -> only that unit is redone
    (one / "curate.json").unlink()
    (one / ".work" / "unit-00001.jsonl").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (one / ".work").glob("unit-*.jsonl")}
    summary = run(compose_cfg(tmp_path, *curate_args(raw, one, "stage.workers=1")))
    after = {p.name: p.stat().st_mtime_ns for p in (one / ".work").glob("unit-*.jsonl")}
    assert {k: after[k] for k in before} == before and "unit-00001.jsonl" in after
    assert manifest(one) == manifest(out) and summary["kept"] == json.loads((out / "curate.json").read_text())["kept"]
    (one / "curate.json").unlink()
    with pytest.raises(ConfigError, match="stage.out"):
        run(compose_cfg(tmp_path, *curate_args(raw, one, "stage.dedup.threshold=0.05")))


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_dedup_catches_what_flat_catches(raw, curated, index):
    """The raw world's inspection deduplicated again through an approximate index: the same clips dropped."""
    out, _ = curated
    cfg = compose_cfg(out.parent, *curate_args(raw, out))
    units = list_units(cfg.stage.input, cfg.stage.unit_size)
    flat = deduplicate(out / WORK, units, cfg.stage.dedup)
    cfg.stage.dedup.index, cfg.stage.dedup.exact_up_to = index, 0
    approximate = deduplicate(out / WORK, units, cfg.stage.dedup)
    assert approximate == flat and sum(r.get("step") == "dedup" for rows in flat.values() for r in rows) >= 15


def test_safety_filter_drops_and_counts(raw, tmp_path):
    """A classifier whose nsfw probability is sigmoid(4) ~ 0.98 for every frame: every clip is blocked at 0.5."""
    model = vit_folder(tmp_path / "vit", ["normal", "nsfw"], weight_scale=0.0, bias=[0.0, 4.0])
    out = tmp_path / "safe"
    summary = run(compose_cfg(tmp_path, *curate_args(raw, out, "stage.workers=1", "stage.aesthetic=[]",
                                                     "stage/safety=classifier", f"stage.safety.model={model}")))
    assert summary["kept"] == 0 and summary["dropped"]["safety"] > 100
    blocked = [r for r in manifest(out) if r.get("step") == "safety"]
    assert all(r["unsafe"] == pytest.approx(float(torch.sigmoid(torch.tensor(4.0))), abs=1e-4) for r in blocked)


def test_shard_input_and_model_steps(synthetic_shards, tmp_path):
    """Existing shards in (a unit per shard); every step a model: a tiny CLIP embeds for dedup and scores aesthetics
    (a LAION head on it), a transformers VLM (a tiny BLIP) recaptions, keeping the motion; two-actor pools."""
    vlm, clip = blip_folder(tmp_path / "blip"), clip_folder(tmp_path / "clip")
    out = tmp_path / "out"
    summary = run(compose_cfg(tmp_path, "stage=curate", f"stage.input={synthetic_shards}", f"stage.out={out}",
                              "stage.generate=null", "stage.truth=null", "stage.workers=1", "stage.dedup.threshold=0",
                              f"stage.dedup.model={clip}", f"stage.aesthetic=[{{aesthetic: {{clip: {clip}}}}}]",
                              "stage.ray.models.recaption.actors=2", "stage.ray.models.embed.batch_size=7",
                              "stage/recaption=vlm", f"stage.recaption.model={vlm}", "stage.recaption.max_new_tokens=12"))
    rows = manifest(out)
    assert summary["inputs"] == summary["kept"] == 160 and summary["shards"] == 4  # distinct clips: none near 0
    assert rows[0]["source"] == "shard-000000.tar:00000000" and rows[0]["original_caption"].startswith("a ")
    for r in rows:
        assert r["caption"].endswith(f", moving {r['annotation']['direction']}") and len(r["caption"].split()) > 4
        assert isinstance(r["aesthetic"], float)
    embeddings = np.load(out / WORK / "inspect-00000.npy")
    assert embeddings.shape == (40, 16) and np.allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 4, atol=0.01)


@pytest.mark.parametrize("override,key", [("stage.aesthetic=[nope]", "stage.aesthetic"),
                                          ("stage.input=/nonexistent", "stage.input"),
                                          ("stage.workers=0", "stage.workers"),
                                          ("stage.dedup.index=annoy", "stage.dedup.index"),
                                          ("stage.ray.models.score.actors=0", "stage.ray.models.score.actors"),
                                          ("stage.dedup.model=./no/clip", "stage.dedup.model"),
                                          ("stage.aesthetic=3", "stage.aesthetic"),
                                          ("+stage.safety={model: x}", "stage.safety"),
                                          ("stage/recaption=vlm", "stage.recaption.model")])
def test_bad_curate_config_names_the_key(raw, tmp_path, override, key):
    args = [a for a in curate_args(raw, tmp_path / "out") if not (override.startswith("stage/recaption")
                                                                  and a.startswith("stage.recaption."))]
    with pytest.raises(ConfigError, match=key):
        compose_cfg(tmp_path, *args, override)


def test_dedup_bench_smoke(tmp_path):
    """`python -m lifecycle.bench.dedup` on a small set: every planted copy caught, exact search its own reference."""
    from lifecycle.bench.dedup import main

    rows = main(["--n", "4000", "--dim", "16", "--sample", "200", "--index", "flat", "hnsw", "--threads", "1",
                 "--out", str(tmp_path)])
    assert [r["index"] for r in rows] == ["flat", "hnsw"] and (tmp_path / "dedup.md").is_file()
    assert rows[0]["caught"] == rows[0]["planted"] == 40 and rows[0]["recall_at_1"] == rows[0]["pair_recall"] == 1.0
    assert rows[1]["caught"] >= 38 and rows[1]["pair_recall"] >= 0.9
