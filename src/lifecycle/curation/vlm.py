"""Recaptioning with a vision-language model: each clip's middle frame described, with its motion phrase kept."""

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from .annotate import describe_motion


def with_motion(text: str, annotation: dict) -> str:
    """`text` with the annotation's motion phrase appended as ", <phrase>" unless already in it; the phrase if empty."""
    phrase = describe_motion(annotation)
    return text if phrase in text else f"{text}, {phrase}" if text else phrase


class VLMCaptioner:
    """Captions clips with a transformers image-text-to-text model (hub id or local folder), in batches."""

    def __init__(self, model: str, prompt: str = "Describe this video frame in one detailed sentence.",
                 batch_size: int = 8, max_new_tokens: int = 60, device: str | None = None,
                 trust_remote_code: bool = False):
        """Loads the model on `device` (CUDA when available), in bf16 where CUDA supports it, else fp32."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        self.pipe = pipeline("image-text-to-text", model=model, device=device, trust_remote_code=trust_remote_code,
                             dtype=torch.bfloat16 if bf16 else torch.float32)
        self.prompt, self.batch_size, self.max_new_tokens = prompt, batch_size, max_new_tokens

    def text(self, original: str) -> str:
        """The model's text input for one clip: the prompt with `{original}` filled in, in the chat template if any."""
        prompt = self.prompt.replace("{original}", original)
        if getattr(self.pipe.processor, "chat_template", None) is None:
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, videos: list[np.ndarray], annotations: list[dict], originals: list[str]) -> list[str]:
        """One caption per uint8 (F, H, W, 3) clip, with `describe_motion(annotation)` appended unless already in it."""
        images = [Image.fromarray(video[len(video) // 2]) for video in videos]
        texts = [self.text(original) for original in originals]
        generated = []
        for i in range(0, len(images), self.batch_size):
            out = self.pipe(images=images[i:i + self.batch_size], text=texts[i:i + self.batch_size],
                            return_full_text=False, max_new_tokens=self.max_new_tokens, padding_side="left")
            generated += [o["generated_text"].strip() for o in out]
        return [with_motion(text, annotation) for text, annotation in zip(generated, annotations)]
