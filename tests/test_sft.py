"""SFT: a curated subset, LoRA or full fine-tuning from a previous export, exported merged or as an adapter."""

import json

import pytest
import torch

from lifecycle.data.curriculum import Curriculum
from lifecycle.data.select import Selection
from lifecycle.data.shards import CurriculumStream, list_shards

from .helpers import compose_cfg

TINY_RUN = ["stage.curriculum=[{name: a, resolution: 16, frames: 8, batch_size: 4, steps: 3}]",
            "stage.validation.prompts.n=2", "stage.validation.num_steps=2", "data.num_workers=0"]


def _sample(key, **meta):
    return {"__key__": key, "json": json.dumps(meta).encode()}


def test_selection_rules(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("a\nb\n")
    assert Selection(min={"aesthetic": 5.0})(_sample("x", aesthetic=5.5))
    assert not Selection(min={"aesthetic": 5.0})(_sample("x", aesthetic=4.9))
    assert not Selection(min={"aesthetic": 5.0})(_sample("x"))  # a missing score is not a pass
    assert Selection(where={"background": ["black", "gray"]})(_sample("x", background="gray"))
    assert not Selection(where={"background": "black"})(_sample("x", background="silver"))
    assert Selection(keys=str(keys))(_sample("b")) and not Selection(keys=str(keys))(_sample("c"))
    with pytest.raises(FileNotFoundError, match="data.select.keys"):
        Selection(keys=str(tmp_path / "missing.txt"))


def test_stream_yields_only_the_selected_subset(synthetic_shards):
    curriculum = Curriculum([{"name": "a", "resolution": 16, "frames": 8, "batch_size": 8, "steps": 5}])
    stream = CurriculumStream(list_shards(synthetic_shards), curriculum, select=Selection(where={"background": ["black"]}))
    captions = [c for batch, _ in zip(stream, range(5)) for c in batch["caption"]]
    assert len(captions) == 40 and all(c.endswith("on a black background") for c in captions)


def _pretrain(tmp_path, shards):
    from lifecycle.stages.pretrain import run as fit

    fit(compose_cfg(tmp_path / "pre", *TINY_RUN, shards=shards))
    return tmp_path / "pre" / "export"


@pytest.mark.parametrize("export", ["merge", "adapter"])
def test_sft_lora_from_an_export_trains_only_the_denoiser_lora(tmp_path, synthetic_shards, export):
    from lifecycle.models import ModelBundle
    from lifecycle.models.lora import has_lora
    from lifecycle.stages.pretrain import run as fit

    parent = _pretrain(tmp_path, synthetic_shards)
    run = tmp_path / "sft"
    cfg = compose_cfg(run, "stage=sft", f"model.pretrained={parent}", *TINY_RUN, f"stage.export={export}",
                      "stage.optimizer.lr=0.01", "stage.ema.decay=null", shards=synthetic_shards)
    fit(cfg)
    lineage = json.loads((run / "export" / "lineage.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"] == str(parent)
    assert (run / "export" / "unet_lora").is_dir() == (export == "adapter")
    base, tuned = ModelBundle.from_pretrained(str(parent)), ModelBundle.from_pretrained(str(run / "export"))
    assert has_lora(tuned.denoiser) == (export == "adapter")
    x = torch.randn(1, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        hidden, pooled = tuned.encode_text(["a red circle moving left"])
        out_tuned = tuned.denoise(x, t, hidden, pooled)
        out_base = base.denoise(x, t, hidden, pooled)
    assert not torch.allclose(out_tuned, out_base, atol=1e-5)  # the LoRA moved the model
    # the text encoder was frozen: SFT changed only the denoiser's LoRA weights
    for (n, a), b in zip(base.text_encoder.state_dict().items(), tuned.text_encoder.state_dict().values()):
        assert torch.equal(a, b), n
