from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# A model small enough for a few-second CPU run, same code path as the embedded default.
TINY = [
    "model.denoiser.unet_config.block_out_channels=[16,32]",
    "+model.denoiser.unet_config.norm_num_groups=8",
    "model.denoiser.unet_config.attention_head_dim=4",
    "model.text_encoder.config.num_hidden_layers=1",
]


def compose_cfg(run_dir, *overrides, shards=None, tiny: bool = True):
    """The composed, validated config the CLI would run, with `run_dir` in place of Hydra's output dir
    (`tiny`: the TINY overrides of the default model)."""
    from hydra import compose, initialize_config_dir

    from lifecycle.config import validate

    extra = [f"data.shards={shards}", "data.generate=null"] if shards else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"run_dir={run_dir}", *(TINY if tiny else []), *extra, *overrides])
    return validate(cfg)


def record_vader_sampling(monkeypatch) -> list[tuple[int, list[bool]]]:
    """Make runs of `lifecycle.stages.vader.run` record each training step as (the number of last sampling steps the
    stage drew to keep gradients, whether gradients were on in each denoiser call of the stage's own sampling)."""
    import torch

    import lifecycle.stages.vader
    from lifecycle.stages.vader import VaderStage, truncation_steps

    steps = []

    class Recording(VaderStage):
        def training_step(self, batch, batch_idx):
            # the stage draws K from its per-batch generator first; a fresh copy of that generator repeats the draw
            drawn = truncation_steps(self.sampling["grad_mode"], self.sampling["grad_steps"], self.step_generator())
            calls, denoise = [], self.bundle.denoise

            def recorded(*args):
                calls.append(torch.is_grad_enabled())
                return denoise(*args)

            self.bundle.denoise = recorded
            try:
                return super().training_step(batch, batch_idx)
            finally:
                del self.bundle.denoise
                steps.append((drawn, calls))

    monkeypatch.setattr(lifecycle.stages.vader, "VaderStage", Recording)
    return steps
