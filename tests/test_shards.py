import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lifecycle.data.curriculum import Curriculum
from lifecycle.data.shards import CurriculumStream, as_uint8, list_shards, resize_clip
from lifecycle.errors import DataError

PHASES = [
    {"name": "low", "resolution": 16, "frames": 4, "batch_size": 6, "steps": 3},
    {"name": "full", "resolution": 32, "frames": 8, "batch_size": 4, "steps": 3},
]


def batches(urls, n, start=0, workers=0, **kw):
    stream = CurriculumStream(urls, Curriculum(PHASES), seed=3, start_batch=start, shuffle_buffer=16, **kw)
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return list(itertools.islice(iter(loader), n))


def test_curriculum_phases_switch_resolution_frames_and_batch(synthetic_shards):
    out = batches(list_shards(synthetic_shards), 7)
    assert [b["video"].shape for b in out[:3]] == [(6, 4, 3, 16, 16)] * 3
    assert [b["video"].shape for b in out[3:]] == [(4, 8, 3, 32, 32)] * 4  # the last phase continues
    assert [b["phase"] for b in out] == [0, 0, 0, 1, 1, 1, 1]
    assert all(len(b["caption"]) == b["video"].shape[0] for b in out)
    assert 0.0 <= float(out[0]["video"].min()) and float(out[0]["video"].max()) <= 1.0


@pytest.mark.parametrize("workers,start,split", [(0, 4, "global"), (2, 4, "global"), (2, 5, "global"), (2, 5, "rank")])
def test_resume_at_any_batch_gives_the_same_batches(synthetic_shards, workers, start, split):
    """Also at a batch that is not a multiple of the worker count: the batches still arrive in order."""
    urls = list_shards(synthetic_shards)
    full = batches(urls, 8, workers=workers, split=split)
    resumed = batches(urls, 8 - start, start=start, workers=workers, split=split)
    assert len(resumed) == 8 - start
    for a, b in zip(full[start:], resumed):
        assert a["caption"] == b["caption"]
        assert torch.equal(a["video"], b["video"])


def test_the_decoded_cache_decodes_each_sample_once_and_changes_no_batch(synthetic_shards, monkeypatch):
    """160 clips read 3 times over (in-process): with the cache each is decoded once; batches stay bit-identical.
    A budget smaller than one clip caches nothing."""
    import lifecycle.data.shards as shards

    decoded = []
    original = shards.decode_sample
    monkeypatch.setattr(shards, "decode_sample", lambda sample, *a: decoded.append(sample["__key__"]) or original(sample, *a))
    urls = list_shards(synthetic_shards)
    runs = {}
    for mb in (0, 64, 0.01):
        decoded.clear()
        runs[mb] = batches(urls, 3 + 118, decoded_cache_mb=mb)  # 18 + 472 samples
        runs[mb, "decodes"] = len(decoded)
    assert runs[64, "decodes"] == 160 and runs[0, "decodes"] == runs[0.01, "decodes"] >= 490
    for a, b in zip(runs[0], runs[64]):
        assert a["caption"] == b["caption"] and torch.equal(a["video"], b["video"])


def test_each_run_is_deterministic_and_reads_many_clips(synthetic_shards):
    urls = list_shards(synthetic_shards)
    a, b = batches(urls, 5, workers=2), batches(urls, 5, workers=2)
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    seen = [c for x in batches(urls, 30) for c in x["caption"]]
    assert len(set(seen)) > 60  # many distinct clips, not one repeated batch


@pytest.mark.parametrize("split", ["global", "rank"])
def test_ranks_read_disjoint_samples_and_halve_the_global_batch(synthetic_shards, split):
    urls = list_shards(synthetic_shards)
    b0, b1 = (batches(urls, 4, rank=r, world_size=2, split=split) for r in (0, 1))
    assert [len(b["caption"]) for b in b0 + b1] == [3, 3, 3, 2] * 2  # global batches 6, then 4
    r0, r1 = ({c for b in out for c in b["caption"]} for out in (b0, b1))
    assert r0 and r1 and not (r0 & r1)


@pytest.mark.parametrize("workers", [0, 2])
def test_global_split_gives_every_world_size_the_same_global_batches(synthetic_shards, workers):
    """Two ranks' slices of each batch, put together, are the one-process batch: same clips, same order."""
    urls = list_shards(synthetic_shards)
    one = batches(urls, 6, split="global")
    ranks = [batches(urls, 6, rank=r, world_size=2, workers=workers, split="global") for r in (0, 1)]
    for b, (r0, r1) in enumerate(zip(*ranks)):
        assert r0["caption"] + r1["caption"] == one[b]["caption"]
        assert torch.equal(torch.cat([r0["video"], r1["video"]]), one[b]["video"])
    resumed = batches(urls, 3, start=3, rank=1, world_size=2, split="global")  # resume on the other world size
    assert [b["caption"] for b in resumed] == [b["caption"][len(b["caption"]) // 2:] for b in one[3:]]


@pytest.mark.faults
def test_corrupt_samples_are_skipped_and_counted(tmp_path, synthetic_shards):
    src = list_shards(synthetic_shards)[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for i, member in enumerate(tin.getmembers()):
            data = tin.extractfile(member).read()
            if i in (0, 3):  # 00000000.json and 00000001.npy
                data = b"not a numpy file"
            if i == 4:  # 00000002.json
                data = b'{"colour": "red"}'  # no caption
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    out = batches([str(bad)], 8)  # more than one pass over the shard's 40 samples
    assert out[-1]["skipped"] >= 3  # two garbled members and one caption-less sample, per pass
    assert [b["video"].shape[0] for b in out[:3]] == [6, 6, 6]  # batches stay full


def _shard(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_video_dtypes_and_ranges_are_checked_not_guessed(tmp_path):
    clip = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
    assert as_uint8(clip, "x") is clip
    np.testing.assert_array_equal(as_uint8(clip.astype(np.float32) / 255, "x"), clip)  # float in [0, 1]
    for bad, match in [(clip.astype(np.float32), r"values in \[0, 255\].*\[0, 1\]"), (clip.astype(np.int16), "dtype int16"),
                       (np.full((4, 8, 8, 3), np.nan, np.float32), "NaN")]:
        with pytest.raises(ValueError, match=match):
            as_uint8(bad, "x")
    # through the stream: a float shard in [0, 1] gives the uint8 shard's batch; a float one in 0..255 is skipped
    meta = b'{"caption": "a red circle"}'
    as_int = _shard(tmp_path / "u8.tar", {f"{i:03d}": {"npy": _npy(clip), "json": meta} for i in range(6)})
    as_float = _shard(tmp_path / "f32.tar", {f"{i:03d}": {"npy": _npy(clip.astype(np.float32) / 255), "json": meta}
                                             for i in range(6)})
    torch.testing.assert_close(batches([as_float], 1)[0]["video"], batches([as_int], 1)[0]["video"], rtol=0, atol=0)
    wrong = _shard(tmp_path / "f255.tar", {f"{i:03d}": {"npy": _npy(clip.astype(np.float32)), "json": meta}
                                           for i in range(6)})
    with pytest.raises(DataError, match="data.max_bad_share: 100 of 100 reads .*float video with values in"):
        batches([wrong], 1)


@pytest.mark.parametrize("case", ["not tars", "no captions", "empty tar"])
def test_data_that_cannot_feed_a_run_stops_it_with_a_clear_error_and_few_warnings(tmp_path, case, caplog):
    caplog.set_level("WARNING", logger="lifecycle.data.shards")
    if case == "not tars":
        urls = []
        for i in range(3):
            (tmp_path / f"{i}.tar").write_bytes(b"this is not a tar file" * 100)
            urls.append(str(tmp_path / f"{i}.tar"))
        match = "read no sample"
    elif case == "no captions":
        from PIL import Image

        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        urls = [_shard(tmp_path / "images.tar", {f"{i:04d}": {"png": png.getvalue()} for i in range(300)})]
        match = "max_bad_in_a_row: the last 50 reads"
    else:
        urls = [_shard(tmp_path / "empty.tar", {})]
        match = "read no sample"
    with pytest.raises(DataError, match=match):
        batches(urls, 1, max_bad_in_a_row=50)
    warnings = [r for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert len(warnings) <= 11  # the first 10 one by one, then at 100, 1000, ...


def test_a_high_share_of_failed_reads_stops_the_run(tmp_path):
    """Every other sample lacks its caption: no long run of failures, but more than 40% of reads fail."""
    clip = np.zeros((4, 8, 8, 3), np.uint8)
    samples = {f"{i:04d}": {"npy": _npy(clip), **({"json": b'{"caption": "x"}'} if i % 2 else {})} for i in range(400)}
    urls = [_shard(tmp_path / "half.tar", samples)]
    with pytest.raises(DataError, match=r"data.max_bad_share: \d+ of 1\d\d reads"):
        batches(urls, 100, max_bad_share=0.4)
    assert len(batches(urls, 30, max_bad_share=0.6)) == 30  # under the share: skipped, counted, trained on


def test_list_shards_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.shards"):
        list_shards(str(tmp_path / "nowhere"))


def test_resize_clip_picks_even_frames_and_area_downsamples():
    video = np.zeros((8, 32, 32, 3), np.uint8)
    video[:, :16] = 255  # top half white
    for f in range(8):
        video[f, 30:, 30:, 0] = f * 10  # frame index in the bottom-right 2x2 block
    out = resize_clip(video, frames=4, size=16)
    assert out.shape == (4, 3, 16, 16)
    assert torch.allclose(out[:, :, :8], torch.ones_like(out[:, :, :8]), atol=0.02)
    assert torch.allclose(out[:, :, 8:15], torch.zeros_like(out[:, :, 8:15]))
    # frames 0, 2, 5, 7 of 8 (evenly spaced, rounded), read from the bottom-right pixel
    picked = [round(float(out[i, 0, 15, 15]) * 255 / 10) for i in range(4)]
    assert picked == [0, 2, 5, 7]
