"""Text side of the bundle: a word-level tokenizer for tiny models, and prompt encoding."""

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # ids 0..3; CLIP pools at <eos> (id 3)


def word_tokenizer(words: list[str], max_length: int = 16) -> PreTrainedTokenizerFast:
    """A lower-cased, whitespace-split word-level tokenizer over `words`.

    Tiny text encoders trained from scratch need no sub-word vocabulary; the result saves and
    loads with `AutoTokenizer` like any hub tokenizer.
    """
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *(w.lower() for w in words)]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_length,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
    )


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (per-token hidden states (B, L, D), pooled embedding (B, D)).

    CLIP-style encoders give their own pooled output; encoder-only models (T5/UMT5) are
    mean-pooled over the attention mask.
    """
    ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).to(text_encoder.device)
    out = text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    hidden = out.last_hidden_state
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        mask = ids.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return hidden, pooled
