"""The held-out judge on the reward curve and its over-optimisation guard (stage.judge, stage.judge_guard)."""

import json
from types import SimpleNamespace

import pytest
import torch

from lifecycle.callbacks.reward_curve import JudgeGuard, RewardCurve, load_trainable_weights, trainable_weights
from lifecycle.errors import ConfigError

from .helpers import compose_cfg
from .test_vader import FAST

# VADER raising the motion reward on two prompts; temporal consistency (each frame predicted from the previous ones)
# is what more motion costs, so it falls as the reward rises
OVER_OPTIMISING = [*(o for o in FAST if not o.startswith("reward=")), "reward=motion", "stage.curve.every_n_steps=1",
                   "stage.curve.num_steps=4", "stage.judge=[temporal]"]


def test_the_guard_trips_only_when_the_judge_falls_past_the_margin_while_the_reward_rises():
    guard = JudgeGuard(margin=0.1, action="stop")
    points = [  # (step, reward, judge) -> new best?
        (0, 0.30, 0.80, True),
        (1, 0.35, 0.85, True),   # both rise: a new best
        (2, 0.36, 0.80, False),  # the judge fell 0.05 < margin
        (3, 0.32, 0.70, False),  # fell 0.15 > margin, but so did the reward (0.32 < 0.35): a bad step, not hacking
    ]
    for step, reward, judge, best in points:
        assert guard.update(step, reward, judge) is best
        assert guard.tripped is None
    assert guard.best == {"step": 1, "judge": 0.85, "reward": 0.35}
    assert guard.update(4, 0.40, 0.74) is False  # 0.85 - 0.74 = 0.11 > 0.1 and 0.40 > 0.35
    assert guard.tripped == {"step": 4, "judge": 0.74, "reward": 0.40}
    guard.update(5, 0.50, 0.20)
    assert guard.tripped["step"] == 4  # the first point it held stays


def test_vader_stops_on_the_judge_and_evaluates_and_exports_the_best_weights(tmp_path):
    from lifecycle.stages.vader import run

    margin = 0.005
    result = run(compose_cfg(tmp_path, *OVER_OPTIMISING, f"stage.judge_guard.margin={margin}"))
    rows = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert all(r["judge"] == r["judge/temporal"] and "reward/motion" in r for r in rows)
    # the rule, recomputed from the curve
    best, tripped = rows[0], None
    for r in rows:
        if r["judge"] >= best["judge"]:
            best = r
        elif best["judge"] - r["judge"] > margin and r["reward"] > best["reward"]:
            tripped = r
            break
    assert tripped is not None and tripped["step"] < 6, "the run must over-optimise within stage.steps=6"
    assert tripped.get("judge_guard") == "tripped" and rows[-1] is tripped
    assert result["steps"] == tripped["step"]  # stopped there
    judged = result["judge"]
    assert judged["best"]["step"] == best["step"] and judged["tripped"]["step"] == tripped["step"]
    assert judged["restored_best"]
    # the evaluation after training samples prompts.train as the curve does: the best step's weights are evaluated
    assert result["after/train/reward"] == pytest.approx(best["reward"], abs=1e-6)
    assert result["after/train/reward"] != pytest.approx(tripped["reward"], abs=1e-6)
    lineage = json.loads((tmp_path / "export" / "lineage.json").read_text())
    assert lineage["step"] == tripped["step"]


NO_CURVE = (["stage.judge=[temporal]"], "set stage.curve.every_n_steps")


@pytest.mark.parametrize("stage, overrides, message", [
    *(("vader", *case) for case in [
        NO_CURVE,
        (["stage.curve.every_n_steps=1", "stage.judge=[vivid]"], "'vivid' is a reward this stage optimises"),
        (["stage.curve.every_n_steps=1", "stage.judge=[colour_acc]"], "'colour_acc' is neither an oracle score"),
        (["stage.curve.every_n_steps=1", "stage.judge=[colour_accuracy]", "stage.judge_guard.action=halt"],
         "stage.judge_guard.action: expected one of stop, best, log"),
        (["stage.curve.every_n_steps=1", "stage.judge=[temporal]", "stage.judge_guard.margin=-0.1"],
         "stage.judge_guard.margin: must be >= 0"),
    ]),
    *((stage, *NO_CURVE) for stage in ("ddpo", "dpo", "grpo")),  # every alignment stage checks its judge
])
def test_judge_config_errors(tmp_path, stage, overrides, message):
    extra = []
    if stage == "dpo":  # its own check wants pair shards
        (tmp_path / "pairs").mkdir()
        (tmp_path / "pairs" / "pairs-000000.tar").touch()
        extra = [f"stage.pairs={tmp_path / 'pairs'}"]
    with pytest.raises(ConfigError, match=message):
        compose_cfg(tmp_path, f"stage={stage}", "reward=vivid", *extra, *overrides)


class _Module(torch.nn.Module):
    def __init__(self, at_boundary: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
        self.frozen = torch.nn.Parameter(torch.tensor(3.0), requires_grad=False)
        self.at_boundary = at_boundary


def test_an_epoch_based_stage_stops_at_its_next_boundary_and_a_resume_keeps_the_guard(tmp_path):
    curve = RewardCurve(None, None, [], tmp_path / "curve.jsonl", every_n_steps=10, sampling={},
                        judge=["colour_accuracy"], guard=JudgeGuard(0.1, "stop"))
    curve.stopping = True
    trainer = SimpleNamespace(global_step=3, should_stop=False)
    curve.on_train_batch_end(trainer, _Module(at_boundary=False))
    assert trainer.should_stop is False  # mid-epoch: no checkpoint may fall here
    curve.on_train_batch_end(trainer, _Module(at_boundary=True))
    assert trainer.should_stop is True
    # killed after the guard tripped but before the boundary: the resumed run still stops, with the same best weights
    curve.guard.update(0, 0.3, 0.9)
    curve.guard.update(5, 0.5, 0.5)
    curve.best_weights = trainable_weights(_Module(True))
    resumed = RewardCurve(None, None, [], tmp_path / "curve.jsonl", every_n_steps=10, sampling={},
                          judge=["colour_accuracy"], guard=JudgeGuard(0.1, "stop"))
    resumed.load_state_dict(curve.state_dict())
    assert resumed.stopping and resumed.guard.best["step"] == 0 and resumed.guard.tripped["step"] == 5
    assert list(resumed.best_weights) == ["w"]  # trainable parameters only
    module = _Module(True)
    with torch.no_grad():
        module.w.mul_(10)
    load_trainable_weights(module, resumed.best_weights)
    assert module.w.tolist() == [1.0, 2.0] and module.frozen.item() == 3.0
