"""Model bundle: build from config (random init) or load with from_pretrained."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from .bundle import ModelBundle
from .folded_unet import FramesAsChannelsUNet
from .text import word_tokenizer

__all__ = ["ModelBundle", "FramesAsChannelsUNet", "build_bundle", "word_tokenizer"]


def build_bundle(cfg: DictConfig) -> ModelBundle:
    """`model.pretrained` (hub id or folder) wins; otherwise instantiate each component's config."""
    if cfg.get("pretrained"):
        return ModelBundle.from_pretrained(cfg.pretrained)
    bundle = ModelBundle(
        denoiser=instantiate(cfg.denoiser, _convert_="all"),
        text_encoder=instantiate(cfg.text_encoder, _convert_="all"),
        tokenizer=instantiate(cfg.tokenizer, _convert_="all"),
        scheduler=instantiate(cfg.scheduler, _convert_="all"),
        vae=instantiate(cfg.vae, _convert_="all") if cfg.get("vae") else None,
    )
    vocab, rows = len(bundle.tokenizer), bundle.text_encoder.get_input_embeddings().num_embeddings
    if vocab > rows:
        raise ValueError(f"model.text_encoder: vocab_size {rows} is smaller than the tokenizer's {vocab} tokens")
    if cfg.get("token_embedding_std"):
        # Text encoders trained from scratch separate rare words (left/right) far better with
        # unit-scale token embeddings than with the usual 0.02 init.
        bundle.text_encoder.get_input_embeddings().weight.data.normal_(0.0, cfg.token_embedding_std)
    return bundle
