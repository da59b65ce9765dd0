"""stage=rwr (reward-weighted regression): the weights by hand, the stage's loss is those weights on its own samples'
denoising errors, a run leaves table, samples and export, and a bad key is one line."""

import json
import math

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.rewards.base import WeightedSum
from lifecycle.stages import rwr

from .helpers import compose_cfg

FAST = ["stage=rwr", "stage.steps=3", "stage.batch_size=2", "stage.num_steps=3", "stage.evaluation.num_steps=3",
        "prompts.train=[a large green circle moving right quickly on a black background,"
        "a small magenta square moving down slowly on a silver background]",
        "prompts.test=[a large red triangle moving left quickly on a black background]",
        "trainer.log_every_n_steps=1", "reward=vivid"]


def test_reward_weights_by_hand():
    # softmax([0, ln 3] / 1) = [1/4, 3/4]; times B = 2: [0.5, 1.5]
    assert torch.allclose(rwr.reward_weights(torch.tensor([0.0, math.log(3)]), 1.0), torch.tensor([0.5, 1.5]))
    # temperature 0.5 doubles the log-ratio: softmax([0, 2 ln 3]) = [1/10, 9/10]
    assert torch.allclose(rwr.reward_weights(torch.tensor([0.0, math.log(3)]), 0.5), torch.tensor([0.2, 1.8]))


def test_the_stage_fits_its_samples_weighted_by_their_rewards(tmp_path, monkeypatch):
    """Each step's loss is mean(B·softmax(r / T)·e) of the rewards r of the videos it sampled and their denoising
    errors e: not the plain mean, not the weights of -r."""
    seen = {"errors": [], "losses": [], "rewards": []}
    errors, step, score = rwr.denoising_errors, rwr.guarded_step, WeightedSum.forward

    def recorded(into, function):
        def wrapper(*args):
            out = function(*args)
            seen[into].append((out if into != "losses" else args[1]).detach())
            return out
        return wrapper

    monkeypatch.setattr(rwr, "denoising_errors", recorded("errors", errors))
    monkeypatch.setattr(rwr, "guarded_step", recorded("losses", step))
    monkeypatch.setattr(WeightedSum, "forward", recorded("rewards", score))
    rwr.run(compose_cfg(tmp_path, *FAST, "stage.evaluation=null", "stage.temperature=0.05"))
    assert len(seen["losses"]) == len(seen["rewards"]) == len(seen["errors"]) == 3
    for r, e, loss in zip(seen["rewards"], seen["errors"], seen["losses"]):
        assert torch.allclose(loss, (2 * torch.softmax(r / 0.05, 0) * e).mean())
        assert not torch.allclose(loss, e.mean()) and not torch.allclose(loss, (2 * torch.softmax(-r / 0.05, 0) * e).mean())


def test_rwr_run_leaves_table_samples_and_export(tmp_path):
    from lifecycle.models import ModelBundle

    result = rwr.run(compose_cfg(tmp_path, *FAST))
    assert result["steps"] == 3 and "after/test/reward" in result
    table = json.loads((tmp_path / "report" / "table.json").read_text())
    assert set(table) == {"before", "after"}
    assert (tmp_path / "samples" / "after" / "test" / "000.mp4").stat().st_size > 0
    assert "train/reward" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert ModelBundle.from_pretrained(str(tmp_path / "export")).denoiser is not None


@pytest.mark.parametrize("override, key", [("stage.temperature=0", "stage.temperature: must be positive"),
                                           ("stage.num_steps=-1", "stage.num_steps: must be positive")])
def test_bad_rwr_config_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        compose_cfg(tmp_path, *FAST, override)
