"""Safety layers on exported samples (lifecycle.outputs): content filter, invisible watermark, provenance."""

import json
import logging
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from imwatermark import WatermarkDecoder, WatermarkEncoder

from lifecycle import __version__, outputs
from lifecycle.outputs.samples import write_samples
from lifecycle.errors import ConfigError
from lifecycle.curation.safety import SafetyFilter
from lifecycle.data.synthetic import prompt_metadata, render_clip
from lifecycle.data.video_io import decode_video, write_video
from lifecycle.outputs.export import save_png
from lifecycle.outputs.provenance import read_embedded
from lifecycle.outputs import Mark
from lifecycle.outputs.watermark import STRENGTH, _coder, detect, embed, main, read_frames, upscale

from .helpers import compose_cfg
from .test_curation_models import vit_folder

FILES = ["000.mp4", "000.gif", "001.mp4", "001.gif", "filmstrip.png"]


@pytest.fixture(autouse=True)
def default_policy():
    outputs.configure(None)
    yield
    outputs.configure(None)


@pytest.fixture(scope="module")
def samples():
    """Two synthetic-world clips (8 x 32 x 32) as (B, F, C, H, W) in [0, 1], and their captions."""
    metas = prompt_metadata(seed=0, n=2)
    clips = np.stack([render_clip(m) for m in metas])
    return torch.from_numpy(clips).permute(0, 1, 4, 2, 3).float() / 255, [m["caption"] for m in metas]


@pytest.fixture(scope="module")
def unsafe_model(tmp_path_factory):
    """A tiny ViT classifier that calls everything nsfw with probability sigmoid(4) = 0.982."""
    return vit_folder(tmp_path_factory.mktemp("vit"), ["normal", "nsfw"], weight_scale=0.0, bias=[0.0, 4.0])


def test_fast_coder_is_imwatermarks_dwtdctsvd():
    frame = np.ascontiguousarray(upscale(render_clip(prompt_metadata(seed=1, n=1)[0])[:1], 256)[0, ..., ::-1])
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"lcyc")
    reference = encoder.encode(frame, "dwtDctSvd", scales=[0, STRENGTH, 0])
    ours = embed(frame[None, ..., ::-1], Mark())[0, ..., ::-1]
    assert np.array_equal(ours, reference)
    decoder = WatermarkDecoder("bits", 32)
    for image in (reference, frame):
        assert np.array_equal(_coder("dwtDctSvd", Mark().bits).decode(image), decoder.decode(
            image, "dwtDctSvd", scales=[0, STRENGTH, 0]))
    assert WatermarkDecoder("bytes", 32).decode(reference, "dwtDctSvd", scales=[0, STRENGTH, 0]) == b"lcyc"


def test_watermark_survives_export_and_unmarked_files_read_as_unmarked(tmp_path, samples, capsys):
    videos, prompts = samples
    write_samples(tmp_path / "marked", videos, prompts, {"score": 1.0})
    for name in FILES:
        assert detect(tmp_path / "marked" / name) == {"detected": True, "bit_accuracy": 1.0}, name
    assert read_frames(tmp_path / "marked" / "000.gif").shape == (8, 256, 256, 3)  # upscaled to min_size
    provenance = json.loads((tmp_path / "marked" / "provenance.json").read_text())
    assert provenance["watermark"] == {"message": "lcyc", "method": "dwtDctSvd", "min_size": 256, "verified": True,
                                       "bit_accuracy": dict.fromkeys(FILES, 1.0)}
    assert not detect(tmp_path / "marked" / "000.mp4", Mark(message="abcd"))["detected"]

    plain = upscale((videos[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy(), 256)
    for name in ("plain.mp4", "plain.gif"):
        write_video(tmp_path / name, plain)
    save_png(tmp_path / "plain.png", plain[0], None)
    for name in ("plain.mp4", "plain.gif", "plain.png"):
        assert detect(tmp_path / name)["bit_accuracy"] < 0.75, name

    assert main([str(tmp_path / "marked" / "000.mp4"), str(tmp_path / "marked" / "filmstrip.png")]) == 0
    assert main([str(tmp_path / "marked" / "001.gif"), str(tmp_path / "plain.mp4")]) == 1
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{tmp_path / 'marked' / '000.mp4'}: watermark present (bit accuracy 1.000)"
    assert printed[-1].startswith(f"{tmp_path / 'plain.mp4'}: no watermark")


def test_provenance_beside_and_inside_the_files(tmp_path, samples):
    # an export chain: a hub model -> pretrain export -> sft export, each export with its lineage.json
    pretrain, sft = tmp_path / "pretrain" / "export", tmp_path / "sft" / "export"
    for folder, stage, parent, step in ((pretrain, "pretrain", "org/base-model", 100), (sft, "sft", str(pretrain), 20)):
        folder.mkdir(parents=True)
        (folder / "lineage.json").write_text(json.dumps({
            "recipe": "tiny", "stage": stage, "parent": parent, "data": "shards", "step": step,
            "run_dir": str(folder.parent), "config": {"big": "not copied"}}))
    cfg = compose_cfg(tmp_path / "run", "recipe=tiny", f"model.pretrained={sft}", "seed=7")
    policy = outputs.configure(cfg)
    assert policy.filter is None and policy.watermark == Mark() and outputs.current() is policy
    videos, prompts = samples
    out = tmp_path / "run" / "samples" / "final"
    write_samples(out, videos, prompts, {"score": 1.0})

    record = json.loads((out / "provenance.json").read_text())
    assert record["lifecycle"] == __version__
    assert 0 <= (datetime.now(timezone.utc) - datetime.fromisoformat(record["time"])).total_seconds() < 60
    assert (record["recipe"], record["stage"], record["seed"], record["run_dir"]) == ("tiny", "pretrain", 7,
                                                                                       str(tmp_path / "run"))
    assert record["model"] == {"pretrained": str(sft), "lineage": [
        {"export": str(sft), "recipe": "tiny", "stage": "sft", "parent": str(pretrain), "step": 20,
         "run_dir": str(sft.parent)},
        {"export": str(pretrain), "recipe": "tiny", "stage": "pretrain", "parent": "org/base-model", "step": 100,
         "run_dir": str(pretrain.parent)},
        {"export": "org/base-model"}]}
    assert record["filter"] is None and record["blocked"] is None
    assert record["samples"] == [{"index": i, "prompt": p, "files": [f"{i:03d}.mp4", f"{i:03d}.gif"],
                                  "blocked": False, "unsafe_score": None} for i, p in enumerate(prompts)]
    assert json.loads((out / "fidelity.json").read_text()) == {"score": 1.0}  # no filter: no count

    run = {k: v for k, v in record.items() if k not in ("samples", "watermark")}
    for name in ("000.mp4", "001.gif"):
        embedded = read_embedded(out / name)
        assert {k: embedded[k] for k in run} == run
        assert embedded["sample"] == record["samples"][int(name[:3])]
        assert embedded["watermark"] == {"message": "lcyc", "method": "dwtDctSvd"}
    assert read_embedded(out / "filmstrip.png")["samples"] == record["samples"]


def test_switched_off_layers(tmp_path, samples):
    outputs.configure(compose_cfg(tmp_path, "outputs.watermark.enabled=false", "outputs.provenance=false"))
    write_samples(tmp_path / "s", *samples, {})
    assert read_frames(tmp_path / "s" / "000.mp4").shape == (8, 32, 32, 3)  # not upscaled
    assert read_embedded(tmp_path / "s" / "000.mp4") is None and read_embedded(tmp_path / "s" / "filmstrip.png") is None
    assert not (tmp_path / "s" / "provenance.json").exists()


@pytest.mark.parametrize("previews, gifs", [(1, ["000.gif"]), (0, []), ("null", ["000.gif", "001.gif"])])
def test_gif_previews_of_the_first_samples_only(tmp_path, samples, previews, gifs):
    outputs.configure(compose_cfg(tmp_path, f"outputs.gif_previews={previews}"))
    write_samples(tmp_path / "s", *samples, {})
    assert sorted(p.name for p in (tmp_path / "s").glob("*.gif")) == gifs
    assert sorted(p.name for p in (tmp_path / "s").glob("*.mp4")) == ["000.mp4", "001.mp4"]  # every sample
    record = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert sorted(f for s in record["samples"] for f in s["files"] if f.endswith(".gif")) == gifs
    assert set(record["watermark"]["bit_accuracy"]) == {"000.mp4", "001.mp4", "filmstrip.png", *gifs}  # all checked


def test_filter_blocks_replaces_and_counts(tmp_path, samples, unsafe_model, caplog, one_thread):
    cfg = compose_cfg(tmp_path, "outputs/filter=classifier", f"outputs.filter.model={unsafe_model}")
    policy = outputs.configure(cfg)
    assert isinstance(policy.filter, SafetyFilter) and policy.filter.threshold == 0.5
    videos, prompts = samples
    with caplog.at_level(logging.WARNING, logger="lifecycle.outputs.export"):
        write_samples(tmp_path / "s", videos, prompts, {"reward": 0.1}, name="scores.json")
    out = tmp_path / "s"
    assert json.loads((out / "scores.json").read_text()) == {"reward": 0.1, "blocked": 2}
    record = json.loads((out / "provenance.json").read_text())
    assert record["blocked"] == 2 and record["filter"]["model"] == unsafe_model
    assert [s["blocked"] for s in record["samples"]] == [True, True]
    assert record["samples"][0]["unsafe_score"] == pytest.approx(1 / (1 + np.exp(-4)), abs=1e-4)
    assert record["watermark"]["verified"]  # the grey replacements carry the watermark too
    for i in range(2):
        frames = read_frames(out / f"{i:03d}.mp4").astype(float)
        assert abs(frames.mean() - 128) < 2 and frames.std() < 4  # grey, give or take the watermark
        assert f"blocked sample {out / f'{i:03d}.mp4'}" in caplog.text and repr(prompts[i]) in caplog.text

    # over the unsafe score, nothing is blocked, and the count is there to say so
    outputs.configure(compose_cfg(tmp_path, "outputs/filter=classifier", f"outputs.filter.model={unsafe_model}",
                                  "outputs.filter.threshold=0.99"))
    write_samples(tmp_path / "t", videos, prompts, {"reward": 0.1}, name="scores.json")
    assert json.loads((tmp_path / "t" / "scores.json").read_text())["blocked"] == 0
    assert np.abs(decode_video((tmp_path / "t" / "000.gif").read_bytes()).astype(float) - upscale(
        (videos[0].permute(0, 2, 3, 1) * 255).round().numpy(), 256)).mean() < 3  # the sample itself


@pytest.mark.parametrize("override, key", [
    ("outputs.watermark.message=''", "outputs.watermark.message"),
    ("outputs.watermark.message=lifecycle", "outputs.watermark.message"),
    ("outputs.watermark.method=rivaGan", "outputs.watermark.method"),
    ("outputs.watermark.min_size=128", "outputs.watermark.min_size"),
    ("outputs.watermark.enabled=sometimes", "outputs.watermark.enabled"),
    ("outputs.gif_previews=-1", "outputs.gif_previews: must be >= 0"),
    ("+outputs.watermark.strength=2", "outputs.watermark.strength"),
    ("outputs/filter=classifier", "outputs.filter.model: missing value"),
    ("+outputs.filter={model:x}", "outputs.filter._target_: missing"),
    ("outputs/filter=classifier outputs.filter.model=/no/such/model", "outputs.filter.model: no such folder"),
    ("outputs/filter=classifier outputs.filter.model=x +outputs.filter.colour=red", "outputs.filter.colour"),
])
def test_config_errors_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        compose_cfg(tmp_path, *override.split())


def test_a_filter_that_does_not_load_is_a_config_error(tmp_path):
    cfg = compose_cfg(tmp_path, "outputs/filter=classifier", f"outputs.filter.model={tmp_path}")  # no model in it
    with pytest.raises(ConfigError, match="outputs.filter: cannot build lifecycle.curation.safety.SafetyFilter"):
        outputs.configure(cfg)
