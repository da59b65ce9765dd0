"""Diffusion-DPO: the loss against a hand computation, the reference model, shared noise, the stage end to end."""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.data import synthetic
from lifecycle.data.preferences import collate_pairs, read_pairs, write_pairs
from lifecycle.diffusion.dpo import dpo_loss

from .helpers import CONF_DIR, compose_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
LOG2 = math.log(2)
BASE = ["stage=dpo", "stage.batch_size=4", "stage.lr_scheduler.warmup_steps=0", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false"]
TRAIN = [*BASE, "stage.evaluation=null"]


# -- the loss -----------------------------------------------------------------------------------
def test_dpo_loss_matches_a_hand_computation():
    beta = 2000.0
    loss_w, loss_l, ref_w, ref_l = [0.30, 0.52], [0.41, 0.47], [0.3004, 0.5198], [0.4098, 0.4703]
    inside = [-0.5 * beta * ((loss_w[i] - loss_l[i]) - (ref_w[i] - ref_l[i])) for i in range(2)]
    reward_w = [-0.5 * beta * (loss_w[i] - ref_w[i]) for i in range(2)]
    reward_l = [-0.5 * beta * (loss_l[i] - ref_l[i]) for i in range(2)]
    expected = sum(math.log(1 + math.exp(-x)) for x in inside) / 2  # −log σ(x) = log(1 + e^{−x})

    terms = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (loss_w, loss_l, ref_w, ref_l)), beta)
    assert inside[0] > 0 > inside[1]
    assert terms.loss.item() == pytest.approx(expected, rel=1e-9)
    assert terms.inside.tolist() == pytest.approx(inside, rel=1e-9)
    assert terms.accuracy.item() == 0.5
    assert terms.margin.item() == pytest.approx(sum(inside) / 2, rel=1e-9)
    assert terms.reward_chosen.item() == pytest.approx(sum(reward_w) / 2, rel=1e-9)
    assert terms.reward_rejected.item() == pytest.approx(sum(reward_l) / 2, rel=1e-9)


def test_dpo_loss_sign():
    ref = torch.tensor([0.5, 0.5, 0.5])
    # the model lowers the chosen sample's error relative to the reference more than the rejected one's
    better = dpo_loss(ref - 1e-3, ref - 1e-4, ref, ref, beta=1000.0)
    assert better.loss.item() < LOG2 and better.accuracy.item() == 1.0 and better.margin.item() > 0
    worse = dpo_loss(ref + 1e-3, ref, ref, ref, beta=1000.0)
    assert worse.loss.item() > LOG2 and worse.accuracy.item() == 0.0 and worse.margin.item() < 0
    assert dpo_loss(ref, ref, ref, ref, beta=1000.0).loss.item() == pytest.approx(LOG2, abs=1e-7)
    # descending the loss lowers the chosen error and raises the rejected one
    loss_w, loss_l = ref.clone().requires_grad_(), ref.clone().requires_grad_()
    dpo_loss(loss_w, loss_l, ref, ref, beta=1000.0).loss.backward()
    assert (loss_w.grad > 0).all() and (loss_l.grad < 0).all()


# -- pairs ----------------------------------------------------------------------------------------
def colour_pairs(n: int, frames: int = 8, size: int = 32, seed: int = 0):
    """Chosen = a clip in the prompt's colour, rejected = the same clip in the opposite hue; the prompt is the
    chosen clip's caption."""
    rng, colours = np.random.default_rng(seed), list(synthetic.COLOURS)
    for i in range(n):
        meta = synthetic.sample_metadata(rng, colour=colours[i % len(colours)])
        other = {**meta, "colour": colours[(i + len(colours) // 2) % len(colours)]}
        yield {"prompt": synthetic.caption(meta), "chosen": synthetic.render_clip(meta, frames, size),
               "rejected": synthetic.render_clip(other, frames, size), "chosen_score": 1.0, "rejected_score": 0.0,
               "scores": [1.0, 0.0], "source": "sampled"}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "colour"
    write_pairs(folder, colour_pairs(4), manifest={"reward": "colour"})
    return str(folder)


def _batch(pairs, resolution: int):
    """All the pairs as one batch."""
    return collate_pairs(list(read_pairs(pairs)), 8, resolution)


# -- the stage on a real batch --------------------------------------------------------------------
def _stage(tmp_path, pairs, *overrides):
    from lifecycle.models import build_bundle
    from lifecycle.stages.dpo import DPOStage
    from lifecycle.stages.runner import make_trainable

    cfg = compose_cfg(tmp_path, *TRAIN, f"stage.pairs={pairs}", "stage.resolution=16", *overrides)
    torch.manual_seed(0)
    bundle = build_bundle(cfg.model)
    start = copy.deepcopy(bundle.denoiser)
    make_trainable(bundle, cfg.stage.lora)
    s = cfg.stage
    stage = DPOStage(bundle, s.beta, dict(s.timesteps), dict(s.optimizer), dict(s.lr_scheduler), dict(s.guard))
    return stage, start, _batch(pairs, s.resolution)


def test_with_lora_at_initialisation_the_policy_is_the_reference_and_the_loss_is_log2(tmp_path, pairs):
    stage, _, batch = _stage(tmp_path, pairs)
    terms = stage.dpo_terms(batch, torch.Generator().manual_seed(0))
    assert stage.reference is None  # LoRA: the reference is the network with its adapters off
    assert torch.equal(terms.inside, torch.zeros(4))
    assert terms.loss.item() == torch.nn.functional.softplus(torch.tensor(0.0)).item()  # log 2 in float32
    assert terms.loss.item() == pytest.approx(LOG2, abs=1e-7) and terms.accuracy.item() == 0.0
    terms.loss.backward()  # yet the loss has a gradient: the adapters start learning from the first step
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in stage.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("lora", [True, False])
def test_reference_stays_the_start_model_while_the_policy_moves(tmp_path, pairs, lora):
    stage, start, batch = _stage(tmp_path, pairs, *([] if lora else ["stage.lora=null"]))
    assert (stage.reference is None) == lora  # full fine-tuning: a frozen copy
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(2):
        stage.dpo_terms(batch, torch.Generator().manual_seed(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    b = stage.bundle
    x = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        hidden, pooled = b.encode_text(batch["prompts"][:2])
        reference = stage.reference_denoise(x, t, hidden, pooled)
        policy = b.denoise(x, t, hidden, pooled)
        base = type(b)(start, None, None, b.scheduler).denoise(x, t, hidden, pooled)
    torch.testing.assert_close(reference, base, rtol=0, atol=1e-6)
    assert (policy - base).abs().max() > 1e-4
    assert [p for p in stage.parameters() if p.requires_grad] == params  # adapters trainable again after the reference


@pytest.mark.parametrize("model", ["tiny_video", "tiny_wan"])
def test_chosen_and_rejected_share_timestep_and_noise(tmp_path, pairs, model):
    from lifecycle.models import build_bundle
    from lifecycle.stages.dpo import DPOStage

    cfg = compose_cfg(tmp_path, *TRAIN, f"stage.pairs={pairs}") if model == "tiny_video" else _wan_cfg(tmp_path, pairs)
    stage = DPOStage(build_bundle(cfg.model), 1.0, dict(cfg.stage.timesteps), {}, {}, {})
    g = torch.Generator().manual_seed(0)
    x0_w, x0_l = torch.randn(2, 6, 3, 4, 8, 8, generator=g)
    x_t, timestep, target = stage.noised(x0_w, x0_l, torch.Generator().manual_seed(1))
    assert x_t.shape == target.shape == (12, 3, 4, 8, 8)
    torch.testing.assert_close(timestep[:6], timestep[6:], rtol=0, atol=0)
    assert len(set(timestep[:6].tolist())) > 1  # one draw per pair
    if stage.bundle.is_flow:  # x_t = (1 − t)·x0 + t·ε, target ε − x0
        t = (timestep[:6] / 1000).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(x_t[:6] - x_t[6:], (1 - t) * (x0_w - x0_l))
        torch.testing.assert_close(target[:6] - target[6:], x0_l - x0_w)
    else:  # x_t = α·x0 + σ·ε
        alpha = stage.bundle.scheduler.alphas_cumprod[timestep[:6]].sqrt().view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(x_t[:6] - x_t[6:], alpha * (x0_w - x0_l))


# -- the stage end to end -------------------------------------------------------------------------
def _metrics(run_dir) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "metrics.csv")))


def test_dpo_learns_the_preferred_colour_and_exports(tmp_path, pairs):
    from lifecycle.models import ModelBundle
    from lifecycle.stages.dpo import DPOStage, run

    prompts = ["prompts.train=[a large red circle moving left quickly on a black background]",
               "prompts.test=[a small blue triangle moving up slowly on a gray background]"]
    evaluation = ["stage.evaluation.num_steps=2", "stage.evaluation.batch_size=2", "stage.evaluation.oracle=false"]
    cfg = compose_cfg(tmp_path, *BASE, f"stage.pairs={pairs}", "stage.steps=30", "stage.export=adapter",
                      *evaluation, *prompts)
    assert run(cfg)["steps"] == 30
    rows = _metrics(tmp_path)
    for key in ("train/loss", "train/implicit_accuracy", "train/reward_margin", "train/grad_norm", "train/lr"):
        assert all(math.isfinite(float(r[key])) for r in rows if r.get(key)), key
    assert float(rows[0]["train/loss"]) == pytest.approx(LOG2, abs=1e-6)  # step 0: policy = reference
    assert "Diffusion-DPO" in (tmp_path / "report" / "table.md").read_text()
    lineage = json.loads((tmp_path / "export" / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["data"] == pairs and lineage["parent"] is None

    # The export reloads with its adapter; with the adapter off it is the start model, so the DPO loss of
    # the trained policy against it, on the training pairs with fixed noise, shows what training did.
    policy = ModelBundle.from_pretrained(str(tmp_path / "export")).eval()
    stage, batch = DPOStage(policy, cfg.stage.beta, dict(cfg.stage.timesteps), {}, {}, {}), _batch(pairs, 32)
    with torch.no_grad():
        terms = [stage.dpo_terms(batch, torch.Generator().manual_seed(k)) for k in range(8)]
    loss = sum(t.loss.item() for t in terms) / len(terms)
    accuracy = torch.cat([t.inside for t in terms]).gt(0).float().mean().item()
    assert loss < LOG2 - 0.1 and accuracy > 0.6, (loss, accuracy)  # from log 2 and accuracy 0 at the start

    # DPO from that (adapter) export starts from the exported policy, adapter included, and takes it as the
    # reference: the first loss is log 2 again, and a step at lr 0 exports the parent's function
    child = tmp_path / "child"
    run(compose_cfg(child, *TRAIN, f"stage.pairs={pairs}", "stage.steps=1", "stage.optimizer.lr=0",
                    f"model.pretrained={tmp_path / 'export'}"))
    assert float(_metrics(child)[0]["train/loss"]) == pytest.approx(LOG2, abs=1e-6)
    assert json.loads((child / "export" / "lineage.json").read_text())["parent"] == str(tmp_path / "export")
    x, t = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([300])
    with torch.no_grad():
        cond = policy.encode_text(batch["prompts"][:1])
        torch.testing.assert_close(ModelBundle.from_pretrained(str(child / "export")).denoise(x, t, *cond),
                                   policy.denoise(x, t, *cond), rtol=1e-4, atol=1e-5)


def test_interrupted_and_resumed_dpo_ends_with_the_same_weights(tmp_path, pairs, monkeypatch):
    """Full fine-tuning (frozen-copy reference): the checkpoint holds the denoiser, resume is exact."""
    from lifecycle.models import ModelBundle
    from lifecycle.stages.dpo import DPOStage, run

    short = [*TRAIN, f"stage.pairs={pairs}", "stage.lora=null", "stage.steps=5", "stage.batch_size=3",
             "stage.resolution=16", "trainer.checkpoint_every_n_steps=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(compose_cfg(straight, *short))
    original = DPOStage.training_step

    def preempted(self, batch, batch_idx):
        if self.global_step == 3:  # a checkpoint exists for step 2
            raise RuntimeError("preempted")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DPOStage, "training_step", preempted)
    with pytest.raises(RuntimeError, match="preempted"):
        run(compose_cfg(resumed, *short))
    monkeypatch.setattr(DPOStage, "training_step", original)
    assert run(compose_cfg(resumed, *short, "trainer.resume=last"))["steps"] == 5

    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["state_dict"] and all(k.startswith("bundle.denoiser.") for k in a["state_dict"])  # no reference copy
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    assert a["lifecycle"]["batches_seen"] == b["lifecycle"]["batches_seen"] == 5
    assert [r["train/loss"] for r in _metrics(straight)] == [r["train/loss"] for r in _metrics(resumed)]
    exported = ModelBundle.from_pretrained(str(resumed / "export"))
    weight = "unet.conv_in.weight"
    assert torch.equal(exported.denoiser.state_dict()[weight], a["state_dict"][f"bundle.denoiser.{weight}"])


def _wan_cfg(run_dir, pairs, *overrides):
    """tiny_wan as configured (the TINY overrides are for the UNet default)."""
    from hydra import compose, initialize_config_dir

    from lifecycle.config import validate

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", "model=tiny_wan", *TRAIN, f"stage.pairs={pairs}",
                                           "stage.frames=4", "stage.resolution=16", *overrides])
    return validate(cfg)


def test_dpo_on_a_flow_matching_model(tmp_path, pairs):
    from lifecycle.stages.dpo import run

    assert run(_wan_cfg(tmp_path, pairs, "stage.steps=2", "stage.batch_size=2"))["steps"] == 2
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert trained and all("lora" in k for k in trained)
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    assert all(math.isfinite(float(r["train/loss"])) for r in _metrics(tmp_path) if r.get("train/loss"))


def test_config_errors_name_the_key(tmp_path, pairs):
    with pytest.raises(ConfigError, match="stage.pairs"):
        compose_cfg(tmp_path, *TRAIN, f"stage.pairs={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match="stage.pairs"):
        compose_cfg(tmp_path, *TRAIN)
    with pytest.raises(ConfigError, match="stage.beta"):
        compose_cfg(tmp_path, *TRAIN, f"stage.pairs={pairs}", "stage.beta=0")
    with pytest.raises(ConfigError, match="stage.timesteps.flow"):
        compose_cfg(tmp_path, *TRAIN, f"stage.pairs={pairs}", "stage.timesteps.flow=cosine")
    with pytest.raises(ConfigError, match="prompts.test"):
        compose_cfg(tmp_path, "stage=dpo", f"stage.pairs={pairs}", "prompts.test=/no/such/prompts.txt")


def test_dpo_reward_curve_starts_where_the_pairs_left_off(tmp_path):
    """The pairs' sampling time and reward queries (their manifest) are the curve's starting point."""
    from lifecycle.stages.dpo import run

    pairs = tmp_path / "pairs"
    write_pairs(pairs, colour_pairs(4), manifest={"reward": "colour", "reward_queries": 96, "seconds": 7.5})
    run(compose_cfg(tmp_path / "run", *TRAIN, f"stage.pairs={pairs}", "stage.steps=2", "stage.curve.every_n_steps=1",
                    "stage.curve.num_steps=2", "reward=colour",
                    "prompts.train=[a large red circle moving left quickly on a black background]"))
    curve = [json.loads(line) for line in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert [p["reward_queries"] for p in curve] == [96, 96, 96]  # DPO itself queries no reward
    assert curve[0]["seconds"] == 7.5 and curve[0]["seconds"] < curve[1]["seconds"] < curve[2]["seconds"]
