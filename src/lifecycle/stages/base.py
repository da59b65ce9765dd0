"""What stages have in common: the config bases every stage's `Config` builds on, the config parts several
stages share, and the declared properties `lifecycle.config.validate` acts on.

A stage is one module `lifecycle.stages.<name>` (or any importable module) holding
  * `Config`: an OmegaConf structured-config dataclass built on one of the bases below; it declares what the
    stage is (the class attributes) and checks what only it knows (`check`), each problem one `ConfigError`
    line naming the key;
  * its LightningModule, when it trains;
  * `run(cfg) -> dict`, what `conf/stage/<name>.yaml`'s `run:` names.
`validate` finds `Config` beside the function `stage.run` names, so adding a stage touches no other module.

Defaults: `conf/stage/<name>.yaml` holds each stage's values. A dataclass default is given only where the
yaml leaves the key out (a node switched on from null, e.g. `stage.lora={rank: 16, alpha: 16}`) or agrees
with every yaml using it; `MISSING` (`???`) otherwise, so a stage file that forgets a key is reported.
"""

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from omegaconf import MISSING, DictConfig

from ..callbacks.reward_curve import JUDGE_ACTIONS, reward_file
from ..config import check_prompts, positive
from ..data.oracle import ORACLE_COLUMNS
from ..errors import ConfigError


@dataclass
class OptimizerConfig:
    lr: float = MISSING
    betas: list[float] = MISSING
    weight_decay: float = MISSING
    eps: float = 1e-8
    fused: Optional[bool] = True  # torch's fused AdamW kernel (CPU and CUDA); null: torch's default


@dataclass
class LRSchedulerConfig:
    name: str = MISSING  # any diffusers.optimization scheduler name
    warmup_steps: int = MISSING


@dataclass
class GuardConfig:
    action: str = "skip"  # skip | stop
    spike_factor: Optional[float] = MISSING  # null: no spike check (rewards as losses have no scale to spike against)
    ema_beta: float = 0.98
    warmup: int = 20
    max_skips_in_a_row: int = 20  # skip: stop once this many updates in a row were skipped


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 8.0
    target_modules: Optional[list[str]] = None  # null: the attention projections
    dropout: float = 0.0


@dataclass
class EvaluationConfig:
    num_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 48
    oracle: bool = True  # synthetic-world prompts: also report pixel-oracle prompt fidelity
    fps: int = 8


@dataclass
class CurveConfig:
    every_n_steps: int = 0  # > 0: reward on prompts.train every n optimizer steps -> <run_dir>/curve.jsonl
    num_steps: int = 10
    guidance_scale: float = 3.0
    seed: int = 0
    batch_size: int = 48


@dataclass
class JudgeGuardConfig:
    margin: float = 0.1  # the judges' mean may fall this far below its best (while the reward rises) before acting
    action: str = "stop"  # stop | best | log: stop training, or train on; both keep the best-by-judge weights


@dataclass
class StageConfig:
    """Every stage: its name and the dotted path of its `run`.

    The class attributes declare what the stage does, for the checks every stage of that kind gets
    (lifecycle.config.validate); `check` adds the stage's own.
    """

    name: str = MISSING
    run: str = MISSING

    trains_with_lightning: ClassVar[bool] = False  # builds a Lightning Trainer: trainer.strategy, logger checked
    backprop_through_reward: ClassVar[bool] = False  # every reward term must be differentiable
    ddim_only: ClassVar[bool] = False  # trains a DDIM-sampled model's stochastic chain (with text_to_video_only)
    exports_adapter: ClassVar[bool] = False  # has lora, export (merge | adapter) and lora_formats

    @classmethod
    def uses_reward(cls, stage: DictConfig) -> bool:
        """Whether the stage builds `cfg.reward` (then checked: importable Rewards, weights, files)."""
        return False

    @classmethod
    def text_to_video_only(cls, stage: DictConfig) -> bool:
        """Whether the stage works on text-to-video models only (an image-to-video model is refused)."""
        return False

    @classmethod
    def resolutions(cls, stage: DictConfig) -> dict[str, int]:
        """`{key: px}` the model's VAE and patch size must divide."""
        return {}

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        """The stage's own start-up checks on the typed config; raise ConfigError("key: what is wrong")."""


@dataclass
class TrainingConfig(StageConfig):
    """A stage that trains weights with a Lightning Trainer and AdamW."""

    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    gradient_clip: Optional[float] = 1.0

    trains_with_lightning: ClassVar[bool] = True


@dataclass
class FineTuneConfig(TrainingConfig):
    """A training stage that trains the bundle's denoiser (LoRA or all of it) and exports the bundle."""

    lora: Optional[LoRAConfig] = field(default_factory=LoRAConfig)  # null: full fine-tuning
    export: str = "merge"  # with LoRA: merge | adapter
    lora_formats: list[str] = field(default_factory=list)  # kohya | comfyui: the LoRA also in these layouts

    exports_adapter: ClassVar[bool] = True


@dataclass
class AlignmentConfig(FineTuneConfig):
    """A fine-tuning stage that aligns the model to a reward on prompt sets, evaluated before and after."""

    frames: int = 8
    resolution: int = 32
    evaluation: Optional[EvaluationConfig] = field(default_factory=EvaluationConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    judge: list[str] = field(default_factory=list)  # held-out judges on the curve (oracle scores or reward names)
    judge_guard: JudgeGuardConfig = field(default_factory=JudgeGuardConfig)

    @classmethod
    def uses_reward(cls, stage: DictConfig) -> bool:
        return True

    @classmethod
    def resolutions(cls, stage: DictConfig) -> dict[str, int]:
        return {"stage.resolution": stage.resolution}

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        positive(cfg.stage, "frames", "resolution")
        if cfg.stage.evaluation is not None:
            check_prompts(cfg, "train", "test")
        curve = cfg.stage.curve
        if curve.every_n_steps < 0:
            raise ConfigError(f"stage.curve.every_n_steps: must be >= 0 (0: off), got {curve.every_n_steps}")
        if curve.every_n_steps:
            check_prompts(cfg, "train")
        check_judge(cfg)


def check_judge(cfg: DictConfig) -> None:
    """`stage.judge`: names an oracle score or a conf/reward file, not a reward the stage optimises, and is measured
    on the curve's points; `stage.judge_guard` has a known action and a margin >= 0."""
    st = cfg.stage
    if not st.judge:
        return
    if not st.curve.every_n_steps:
        raise ConfigError("stage.judge: judges are measured on the reward curve's points; set stage.curve.every_n_steps")
    for name in st.judge:
        if name in (cfg.get("reward") or {}):
            raise ConfigError(f"stage.judge: {name!r} is a reward this stage optimises; a judge must be held out")
        if name not in ORACLE_COLUMNS and not reward_file(name).is_file():
            raise ConfigError(f"stage.judge: {name!r} is neither an oracle score ({', '.join(ORACLE_COLUMNS)}) nor a "
                              f"reward file ({reward_file(name)})")
    if st.judge_guard.action not in JUDGE_ACTIONS:
        raise ConfigError(f"stage.judge_guard.action: expected one of {', '.join(JUDGE_ACTIONS)}, "
                          f"got {st.judge_guard.action!r}")
    if st.judge_guard.margin < 0:
        raise ConfigError(f"stage.judge_guard.margin: must be >= 0, got {st.judge_guard.margin}")

