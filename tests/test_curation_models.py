"""VLM recaptioning, the safety filter and the dedup embedding on tiny random models, loaded through the same
from_pretrained path as real weights (saved to a folder, read back by `transformers`)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from lifecycle.curation.annotate import describe_motion
from lifecycle.curation.embed import ImageEmbedder
from lifecycle.curation.safety import SafetyFilter
from lifecycle.curation.vlm import VLMCaptioner, with_motion

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = "describe this video frame in one detailed sentence . a photo of red blue green circle square ball".split()
# none of these phrases' words is in the vocabulary, so a generation never contains them and they get appended
ANNOTATIONS = [
    {"motion": "static", "direction": None, "travel": 0.0},
    {"motion": "panning", "direction": None, "travel": 0.3},
    {"motion": "object", "direction": None, "travel": 0.01},
]


def blip_folder(out, silent: bool = False) -> str:
    """A tiny random BLIP captioner with a word-level BERT vocabulary, saved like a hub folder. Its LM-head bias rules
    out the special tokens, so captions run to full length of words, or, when `silent`, forces [SEP] (the end) first."""
    torch.manual_seed(0)
    vocab = out / "vocab.txt"
    out.mkdir()
    vocab.write_text("\n".join([*SPECIALS, *WORDS]) + "\n")
    # wide inits so that the image sways the words: BLIP's vision default (1e-10) makes captions blind to it
    text = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=5, sep_token_id=3,
                eos_token_id=3, initializer_range=0.3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, initializer_range=0.02)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(SPECIALS)] = -1e4
        model.text_decoder.cls.predictions.bias[SPECIALS.index("[SEP]")] = 1e4 if silent else -1e4
    model.save_pretrained(out)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(vocab))).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return blip_folder(tmp_path_factory.mktemp("blip") / "model")


@pytest.fixture(scope="module")
def videos():
    """Five clips of different lengths and sizes; the last has the fourth's middle frame and different other ones."""
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8) for f, h, w in
             [(8, 32, 32), (1, 24, 40), (5, 48, 32), (4, 32, 32)]]
    twin = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    twin[2] = clips[3][2]
    return [*clips, twin]


@pytest.fixture(scope="module")
def captioner(blip_dir, one_thread):
    return VLMCaptioner(blip_dir, batch_size=2, max_new_tokens=6)


def test_with_motion():
    moving = {"motion": "object", "direction": "left", "travel": 0.2}
    assert with_motion("a red ball", moving) == "a red ball, moving left"
    assert with_motion("a red ball moving left fast", moving) == "a red ball moving left fast"
    assert with_motion("", moving) == "moving left"


def test_captions_batched_like_single(captioner, videos):
    annotations = [ANNOTATIONS[i % 3] for i in range(len(videos))]
    captions = captioner(videos, annotations, [""] * len(videos))
    assert len(captions) == len(videos)
    for caption, annotation in zip(captions, annotations):
        phrase = describe_motion(annotation)
        assert isinstance(caption, str) and caption.endswith(f", {phrase}")
        generated = caption[: -len(phrase) - 2]
        assert generated and generated == generated.strip()
        assert not generated.lower().startswith("describe this video frame")  # the prompt echo is stripped
    assert captions[3].rsplit(", ", 1)[0] == captions[4].rsplit(", ", 1)[0]  # only the middle frame is looked at
    captioner.batch_size = 1
    try:
        assert captioner(videos, annotations, [""] * len(videos)) == captions
    finally:
        captioner.batch_size = 2


def test_original_in_prompt(captioner, videos):
    clips, annotations, originals = videos[:3], ANNOTATIONS, ["red", "blue", "green"]
    captioner.prompt = "a photo of {original}"
    try:
        captions = captioner(clips, annotations, originals)
        for clip, annotation, original, caption in zip(clips, annotations, originals, captions):
            captioner.prompt = f"a photo of {original}"
            assert captioner([clip], [annotation], ["ignored without the placeholder"]) == [caption]
        captioner.prompt = "a photo of"
        assert captioner(clips, annotations, originals) == captioner(clips, annotations, ["x", "y", "z"])
    finally:
        captioner.prompt = "Describe this video frame in one detailed sentence."


def test_chat_template_renders_prompt(blip_dir, captioner, videos, one_thread):
    """A processor with a chat template gets the prompt through it (this one prefixes "a photo of"). BlipProcessor
    drops a saved template on loading, so it is set on the loaded one."""
    chat = VLMCaptioner(blip_dir, prompt="{original}", batch_size=2, max_new_tokens=6)
    chat.pipe.processor.chat_template = "a photo of {% for c in messages[0].content %}{{ c.text or '' }}{% endfor %}"
    assert chat.text("red") == "a photo of red"
    captioner.prompt = "a photo of red"
    try:
        assert chat(videos, ANNOTATIONS[:1] * 5, ["red"] * 5) == captioner(videos, ANNOTATIONS[:1] * 5, [""] * 5)
    finally:
        captioner.prompt = "Describe this video frame in one detailed sentence."


def test_empty_generation_falls_back_to_phrase(tmp_path, videos, one_thread):
    silent = VLMCaptioner(blip_folder(tmp_path / "silent", silent=True), batch_size=2, max_new_tokens=6)
    assert silent(videos[:3], ANNOTATIONS, ["", "", ""]) == [describe_motion(a) for a in ANNOTATIONS]


def vit_folder(out, labels: list[str], weight_scale: float, bias: list[float]) -> str:
    """A tiny ViT classifier over `labels` whose head weight is random times `weight_scale` and bias is `bias`."""
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=16, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.mul_(weight_scale)
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


def test_safety_known_probability(tmp_path, videos, one_thread):
    b = 0.7
    folder = vit_folder(tmp_path, ["normal", "nsfw"], weight_scale=0.0, bias=[0.0, b])
    expected = 1 / (1 + np.exp(-b))  # softmax([0, b])[1]
    scores = SafetyFilter(folder, batch_size=4).scores(videos)
    assert scores == pytest.approx([expected] * len(videos), abs=1e-4)
    assert SafetyFilter(folder, threshold=expected - 1e-3).unsafe(videos) == [True] * len(videos)
    assert SafetyFilter(folder, threshold=expected + 1e-3).unsafe(videos) == [False] * len(videos)


def test_safety_sums_unsafe_labels_beyond_top5(tmp_path, videos, one_thread):
    labels = ["normal", "a", "b", "c", "d", "gore", "nsfw"]
    bias = [3.0, 2.5, 2.0, 1.5, 1.0, -1.0, -2.0]  # the unsafe labels rank last, outside a top 5
    folder = vit_folder(tmp_path, labels, weight_scale=0.0, bias=bias)
    probs = torch.tensor(bias).softmax(0)
    assert SafetyFilter(folder, unsafe_labels=["nsfw", "gore", "absent"]).scores(videos[:2]) == pytest.approx(
        [float(probs[5] + probs[6])] * 2, abs=1e-4)


def test_safety_max_over_spread_frames(tmp_path, videos, one_thread):
    folder = vit_folder(tmp_path, ["normal", "nsfw"], weight_scale=50.0, bias=[0.0, 0.0])
    safety = SafetyFilter(folder, frames=3, batch_size=2)
    model, processor = safety.pipe.model, safety.pipe.image_processor

    def frame_probs(video):
        inputs = processor([Image.fromarray(f) for f in video], return_tensors="pt")
        with torch.no_grad():
            return model(**inputs).logits.softmax(-1)[:, 1].numpy()

    per_frame = frame_probs(videos[0])
    assert per_frame.max() - per_frame.min() > 0.05  # the frames do score differently
    expected = [per_frame[[0, 4, 7]].max(), frame_probs(videos[1]).max(), frame_probs(videos[2])[[0, 2, 4]].max()]
    assert safety.scores(videos[:3]) == pytest.approx(expected, abs=1e-4)


def test_safety_rejects_unknown_labels(tmp_path, one_thread):
    folder = vit_folder(tmp_path, ["normal", "nsfw"], weight_scale=0.0, bias=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"stage\.safety\.unsafe_labels.*\['normal', 'nsfw'\]"):
        SafetyFilter(folder, unsafe_labels=["porn"])


def clip_folder(out, siglip: bool = False) -> str:
    """A tiny random CLIP (or SigLIP) image-text model (projection 16) and its image processor, saved like a hub folder."""
    torch.manual_seed(0)
    text = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if siglip:
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(out)
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    else:
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip"])
def test_embedding_model_by_hand(tmp_path, videos, siglip, one_thread):
    """The clip embedding: the mean of the frames' unit image features, renormalised, times sqrt(D)."""
    folder = clip_folder(tmp_path / "model", siglip=siglip)
    embedder = ImageEmbedder(folder, frames=2)
    model = (SiglipModel if siglip else CLIPModel).from_pretrained(folder).eval()
    processor = (SiglipImageProcessor if siglip else CLIPImageProcessor).from_pretrained(folder)
    out = embedder(videos[:3])
    for video, emb in zip(videos[:3], out):
        frames = [Image.fromarray(video[0]), Image.fromarray(video[-1])]  # 2 frames spread over the clip: the ends
        with torch.no_grad():
            features = model.get_image_features(**processor(images=frames, return_tensors="pt"))
        features = getattr(features, "pooler_output", features)
        mean = torch.nn.functional.normalize(features, dim=-1).mean(0)
        expected = mean / mean.norm() * mean.numel() ** 0.5
        np.testing.assert_allclose(emb, expected.numpy(), atol=1e-4)
        assert np.linalg.norm(emb) == pytest.approx(np.sqrt(len(emb)), rel=1e-5)
    assert np.allclose(embedder([videos[0]])[0], out[0], atol=1e-5)  # a clip's embedding is its own, batch or not


def test_embedding_model_without_image_features(tmp_path):
    folder = vit_folder(tmp_path / "vit", ["a", "b"], weight_scale=1.0, bias=[0.0, 0.0])
    with pytest.raises(ValueError, match="stage.dedup.model"):
        ImageEmbedder(folder)
