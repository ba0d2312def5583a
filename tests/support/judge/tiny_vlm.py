"""A tiny, randomly initialised LLaVA (CLIP vision tower + Llama text model) saved in
transformers format — built offline from configs and a word-level tokenizer, so the local
`transformers` judge backend can be exercised end to end without downloading anything. Its
answers are random words; only the plumbing is under test."""

from __future__ import annotations

from pathlib import Path

WORDS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<image>", "user", "assistant",
         "yes", "no", "Yes", "No", "the", "image", "same", "subject", "style"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def build_tiny_llava(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
        eos_token="<|im_end|>", additional_special_tokens=["<image>", "<|im_start|>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=CHAT_TEMPLATE, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14,
                                       projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                                eos_token_id=4),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
