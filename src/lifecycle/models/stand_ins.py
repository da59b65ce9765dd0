"""Hub-shaped folders with random weights, for models whose weights cannot be downloaded where a check runs.

A real model's config group (`conf/model/<name>.yaml`) holds its components' full configs beside `pretrained`, so
`model.pretrained=null` builds the same classes at the same shapes with random weights; `MINIATURES` scales each
down by one override set (widths and depths only: the classes, the folder layout and the keys stay). `model_folder`
saves such a build with `save_pretrained`, so it loads back through `from_pretrained` exactly as the hub folder
would. `reward_folder` does the same for the reward backbones the real recipes name (CLIP ViT-L/14 for the
aesthetic predictor and the CLIP score, ViT-H/14 for HPS, V-JEPA 2 ViT-L), at real or miniature size.

Used by `make gpu-check` (real shapes, random weights: step time and memory are what they would be with the
published weights) and by the recipes' miniature tests (reduced width, CPU).
"""

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import CLIPConfig, CLIPModel, VJEPA2Config, VJEPA2Model

from .. import CONF_DIR
from ..data.prompts import vocabulary
from . import build_bundle
from .bundle import ModelBundle
from .text import word_tokenizer

_TEXT = ["model.text_encoder.config.hidden_size=32", "model.text_encoder.config.intermediate_size=64",
         "model.text_encoder.config.num_hidden_layers=1", "model.text_encoder.config.num_attention_heads=2",
         "model.text_encoder.config.projection_dim=32"]
_SD_VAE = ["model.vae.block_out_channels=[32,32,32,32]", "model.vae.layers_per_block=1"]
_UNET = ["model.denoiser.block_out_channels=[32,32,32,32]", "model.denoiser.layers_per_block=1",
         "model.denoiser.cross_attention_dim=32", "model.denoiser.attention_head_dim=4"]
# One override set per real model config: the same classes and keys at a width that trains on a CPU in seconds.
MINIATURES = {
    "modelscope_t2v": [*_UNET, *_SD_VAE, *_TEXT],
    "sd15": [*_UNET, *_SD_VAE, *_TEXT],
    "svd_xt": ["model.denoiser.block_out_channels=[32,32,32,32]", "model.denoiser.layers_per_block=1",
               "model.denoiser.num_attention_heads=[2,2,2,2]", "model.denoiser.cross_attention_dim=32",
               "model.denoiser.addition_time_embed_dim=8", "model.denoiser.projection_class_embeddings_input_dim=24",
               *_SD_VAE, "model.image_encoder.config.hidden_size=32", "model.image_encoder.config.intermediate_size=64",
               "model.image_encoder.config.num_hidden_layers=1", "model.image_encoder.config.num_attention_heads=2",
               "model.image_encoder.config.projection_dim=32", "model.image_encoder.config.image_size=28"],
    "wan2_1_t2v_1_3b": ["model.denoiser.num_attention_heads=2", "model.denoiser.attention_head_dim=16",
                        "model.denoiser.ffn_dim=64", "model.denoiser.num_layers=1", "model.denoiser.text_dim=32",
                        "model.denoiser.freq_dim=32", "model.vae.base_dim=8", "model.vae.num_res_blocks=1",
                        "model.text_encoder.config.d_model=32", "model.text_encoder.config.d_ff=64",
                        "model.text_encoder.config.d_kv=16", "model.text_encoder.config.num_heads=2",
                        "model.text_encoder.config.num_layers=1", "model.tokenizer.max_length=32"],
}


def model_config(name: str, *overrides: str, miniature: bool = False):
    """`conf/model/<name>.yaml` with random weights (`pretrained` null), optionally at miniature width."""
    extra = MINIATURES[name] if miniature else []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[f"model={name}", "model.pretrained=null", *extra, *overrides]).model


def model_folder(name: str, out: Path, *overrides: str, miniature: bool = True, seed: int = 0) -> Path:
    """Build `name` with random weights (seeded) and save it as a hub folder (model_index.json, unet/ or
    transformer/, vae/, text_encoder/ or image_encoder/, tokenizer/, scheduler/) at `out`."""
    torch.manual_seed(seed)
    bundle: ModelBundle = build_bundle(model_config(name, *overrides, miniature=miniature))
    return bundle.save_pretrained(out)


def _clip(vision: tuple[int, int, int, int], text: tuple[int, int, int, int], projection: int, image_size: int):
    """A CLIPModel config from (hidden, intermediate, layers, heads) of its two towers."""
    def tower(hidden, intermediate, layers, heads):
        return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                "num_attention_heads": heads}

    return CLIPConfig(text_config={**tower(*text), "max_position_embeddings": 77},
                      vision_config={**tower(*vision), "image_size": image_size, "patch_size": 14,
                                     "hidden_act": "gelu"},
                      projection_dim=projection)


# Reward backbones: (model class, real-size config, miniature config).
_VIT_L14 = (CLIPModel,  # ViT-L/14: the aesthetic predictor's backbone and the CLIP score's
            lambda: _clip((1024, 4096, 24, 16), (768, 3072, 12, 12), 768, 224),
            lambda: _clip((32, 64, 1, 2), (32, 64, 1, 2), 16, 28))
REWARD_BACKBONES = {
    "aesthetic": _VIT_L14,
    "clip_score": _VIT_L14,
    "hps": (CLIPModel, lambda: _clip((1280, 5120, 32, 16), (1024, 4096, 24, 16), 1024, 224),  # ViT-H/14
            lambda: _clip((32, 64, 1, 2), (32, 64, 1, 2), 16, 28)),
    "vjepa": (VJEPA2Model, VJEPA2Config,  # ViT-L, 256 px crops, tubelets of 2 frames
              lambda: VJEPA2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, crop_size=32,
                                   pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2,
                                   num_pooler_layers=1)),
}
# The reward config key that takes the backbone's folder.
REWARD_KEYS = {"aesthetic": "reward.aesthetic.clip", "clip_score": "reward.clip_score.model", "hps": "reward.hps.model",
               "vjepa": "reward.vjepa.model"}


def recipe_rewards(overrides) -> list[str]:
    """The reward terms a recipe's `reward=` override names (`reward=a` or `reward=[a,b]`) that have a stand-in
    backbone (REWARD_KEYS), in REWARD_KEYS order."""
    named = [t.strip() for o in overrides if o.startswith("reward=") for t in o.split("=", 1)[1].strip("[]").split(",")]
    return [r for r in REWARD_KEYS if r in named]


def reward_folder(name: str, out: Path, miniature: bool = True, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> Path:
    """A random `name` reward backbone (REWARD_BACKBONES) saved as a hub folder; CLIP folders get a word-level
    tokenizer over the synthetic world's words (any prompt tokenizes, unknown words as <unk>)."""
    cls, real, mini = REWARD_BACKBONES[name]
    torch.manual_seed(seed)
    model = cls((mini if miniature else real)()).to(dtype)
    model.save_pretrained(out)
    if cls is CLIPModel:
        word_tokenizer(vocabulary(), max_length=77).save_pretrained(out)
    return Path(out)
