"""Training on two CPU processes (gloo). Pre-training: DDP and FSDP2 runs match one process with the same
global batch, and a sharded checkpoint saved on two ranks resumes on one. Every stage trains under both
strategies, with LoRA and with full fine-tuning (a few combinations here; all of them with `make distributed`).

Stated tolerance: per-step losses within 1e-5 relative, final weights within 1e-5 absolute (float32
all-reduces sum in another order than one process does; measured differences are about 1e-6).
"""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from .helpers import TINY

STEPS = 6
ARGS = [
    "stage=pretrain", *TINY,
    "stage.curriculum=[{name:low,resolution:16,frames:8,batch_size:4,steps:3},"
    "{name:full,resolution:32,frames:8,batch_size:2,steps:3}]",
    "stage.lr_scheduler.name=constant_with_warmup",  # the schedule does not depend on trainer.max_steps
    "stage.lr_scheduler.warmup_steps=2", "stage.ema.decay=0.9",
    "stage.validation.num_steps=2", "stage.validation.prompts.n=2",
    "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.generate=null",
]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"]
STRATEGIES = {"ddp": ["trainer.strategy=ddp"], "fsdp": FSDP}


def launch(run_dir: Path, shards: str, *overrides: str, args: list[str] = ARGS) -> None:
    done = subprocess.run([sys.executable, "-m", "lifecycle", *args, f"data.shards={shards}", *overrides,
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same loss at every step and the same exported (EMA) weights, within the stated tolerance."""
    a, b = losses(reference), losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(STEPS))
    torch.testing.assert_close(torch.tensor([b[s] for s in a]), torch.tensor(list(a.values())), rtol=1e-5, atol=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        want, got = load_file(reference / "export" / part), load_file(run_dir / "export" / part)
        assert want.keys() == got.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=f"{part}: {name}")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, synthetic_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    launch(run_dir, synthetic_shards)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, synthetic_shards, one_process, strategy):
    launch(tmp_path, synthetic_shards, *STRATEGIES[strategy], "trainer.devices=2")
    assert_same_run(tmp_path, one_process)


def test_sharded_checkpoint_saved_on_two_ranks_resumes_on_one(tmp_path, synthetic_shards, one_process):
    launch(tmp_path, synthetic_shards, *FSDP, "trainer.devices=2", "trainer.max_steps=3")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    tensors = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    weight = "bundle.denoiser.unet.conv_in.weight"
    for key in (f"model.{weight}", f"ema.{weight}", f"optimizer_0.state.{weight}.exp_avg"):
        rows = sorted((c.offsets[0], c.sizes[0]) for c in tensors[key].chunks)
        assert rows == [(0, 8), (8, 8)], key  # each rank wrote its half of dim 0 (16 channels): never gathered

    launch(tmp_path, synthetic_shards, *FSDP, "trainer.devices=1", f"trainer.max_steps={STEPS}", "trainer.resume=last")
    assert_same_run(tmp_path, one_process)


# -- every stage, both strategies, LoRA and full fine-tuning --------------------------------------
PROMPTS = ["prompts.train=[a large green circle moving right quickly on a black background,"
           "a small magenta square moving down slowly on a silver background]",
           "prompts.test=[a large red triangle moving left quickly on a black background,"
           "a small blue triangle moving up slowly on a gray background]"]
STAGES = {
    "pretrain": ["stage=pretrain", "stage.curriculum=[{name:a,resolution:16,frames:8,batch_size:4,steps:2}]",
                 "stage.validation.num_steps=2", "stage.validation.prompts.n=2"],
    "sft": ["stage=sft", "stage.curriculum=[{name:a,resolution:16,frames:8,batch_size:4,steps:2}]",
            "stage.validation.num_steps=2", "stage.validation.prompts.n=2"],
    "dpo": ["stage=dpo", "stage.batch_size=2", "stage.steps=2", "stage.evaluation=null"],
    "ddpo": ["stage=ddpo", "reward=vivid", "stage.epochs=1", "stage.sample.batch_size=2", "stage.sample.num_batches=1",
             "stage.sample.num_steps=4", "stage.ppo.batch_size=1", "stage.evaluation.num_steps=2",
             "stage.evaluation.batch_size=2"],
    "vader": ["stage=vader", "reward=vivid", "stage.steps=2", "stage.batch_size=2", "stage.sampling.num_steps=4",
              "stage.evaluation.num_steps=2"],
}
# DDPO: test_ddpo.py runs 2 ranks; GRPO: test_grpo.py, DDP and FSDP2 (make distributed)
IN_SUITE = {("sft", "fsdp", "lora"), ("dpo", "fsdp", "full"), ("vader", "fsdp", "lora")}
MATRIX = [pytest.param(stage, strategy, tuning, marks=() if (stage, strategy, tuning) in IN_SUITE else pytest.mark.matrix)
          for stage in STAGES for strategy in STRATEGIES for tuning in ("lora", "full")]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    from lifecycle.data.preferences import write_pairs

    from .test_dpo import colour_pairs

    folder = tmp_path_factory.mktemp("pairs") / "colour"
    write_pairs(folder, colour_pairs(8), manifest={"reward": "colour"})
    return str(folder)


@pytest.mark.parametrize("stage,strategy,tuning", MATRIX)
def test_every_stage_trains_on_two_processes(tmp_path, synthetic_shards, one_process, pairs, stage, strategy, tuning):
    """From the pre-trained export, two ranks train and export weights that moved; FSDP checkpoints are sharded."""
    lora = "stage.lora=null" if tuning == "full" else "stage.lora={rank:4}" if stage == "pretrain" else "stage.lora.rank=4"
    overrides = [*STAGES[stage], lora, *STRATEGIES[strategy], "trainer.devices=2", *PROMPTS,
                 f"model.pretrained={one_process / 'export'}", f"stage.pairs={pairs}" if stage == "dpo" else "seed=0"]
    launch(tmp_path, synthetic_shards, *overrides, args=[*TINY, "trainer.log_every_n_steps=1",
                                                        "trainer.enable_progress_bar=false", "data.generate=null"])
    assert (tmp_path / "checkpoints" / "last.ckpt" / "meta.pt").is_file() == (strategy == "fsdp")
    part = "unet/diffusion_pytorch_model.safetensors"
    start, trained = load_file(one_process / "export" / part), load_file(tmp_path / "export" / part)
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
