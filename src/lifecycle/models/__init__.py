"""Model bundle: build from config (random init) or load with from_pretrained."""

from hydra.utils import instantiate
from omegaconf import DictConfig

from .bundle import ModelBundle
from .folded_unet import FramesAsChannelsUNet
from .image_to_video import ImageCondition, ImageConditioning
from .text import word_tokenizer

__all__ = [
    "ModelBundle", "FramesAsChannelsUNet", "ImageCondition", "ImageConditioning", "build_bundle", "word_tokenizer",
]


def build_bundle(cfg: DictConfig) -> ModelBundle:
    """`model.pretrained` (hub id or folder) wins; otherwise instantiate each component's config.

    Text-to-video models set `text_encoder` and `tokenizer`; image-to-video (SVD) models set
    `image_encoder` instead. `model.conditioning` (SVD micro-conditioning) applies either way.
    """
    conditioning = cfg.get("conditioning")
    if cfg.get("pretrained"):
        bundle = ModelBundle.from_pretrained(cfg.pretrained, trust_remote_code=cfg.get("trust_remote_code", False),
                                             token=cfg.get("token"))
        if conditioning:
            bundle.conditioning = ImageConditioning(**conditioning)
        return bundle

    def part(name):
        return instantiate(cfg[name], _convert_="all") if cfg.get(name) else None

    bundle = ModelBundle(
        denoiser=instantiate(cfg.denoiser, _convert_="all"),
        text_encoder=part("text_encoder"),
        tokenizer=part("tokenizer"),
        scheduler=instantiate(cfg.scheduler, _convert_="all"),
        vae=part("vae"),
        image_encoder=part("image_encoder"),
        conditioning=conditioning,
    )
    if bundle.text_encoder is None:
        return bundle
    vocab, rows = len(bundle.tokenizer), bundle.text_encoder.get_input_embeddings().num_embeddings
    if vocab > rows:
        raise ValueError(f"model.text_encoder: vocab_size {rows} is smaller than the tokenizer's {vocab} tokens")
    if cfg.get("token_embedding_std"):
        # Text encoders trained from scratch separate rare words (left/right) far better with
        # unit-scale token embeddings than with the usual 0.02 init.
        bundle.text_encoder.get_input_embeddings().weight.data.normal_(0.0, cfg.token_embedding_std)
    return bundle
