"""Tiny random-weight models of five more families: Qwen2.5-VL, Qwen3-VL, Gemma 3,
LLaVA-NeXT and LLaVA-NeXT-Video (see utils.models.tiny for the recipe).

Each `build_<family>(out_dir)` writes a Hugging Face directory that optimum-intel
exports with `--task image-text-to-text` and that both OpenVINO GenAI pipelines run.
Shapes are the smallest the architectures take; the pixel limits and grids are small
versions of the real ones, so small test images exercise the same arithmetic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from utils.models.tiny_common import (
    init_model,
    llama_tokenizer,
    qwen_tokenizer,
    save_model,
    token_ids,
    train_bpe,
    with_bos,
    zero_unused_vocab_rows,
)
from utils.models.tiny_templates import (
    GEMMA3_CHAT_TEMPLATE,
    GEMMA3_SPECIAL_TOKENS,
    LLAVA_NEXT_CHAT_TEMPLATE,
    LLAVA_NEXT_SPECIAL_TOKENS,
    LLAVA_NEXT_VIDEO_CHAT_TEMPLATE,
    LLAVA_NEXT_VIDEO_SPECIAL_TOKENS,
    QWEN2_5_VL_CHAT_TEMPLATE,
    QWEN2_5_VL_SPECIAL_TOKENS,
    QWEN3_VL_CHAT_TEMPLATE,
    QWEN3_VL_SPECIAL_TOKENS,
)

# --- Qwen


def _qwen_text(tokenizer: Any, ids: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        **extra,
    }


def _qwen_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def build_qwen2_5_vl(out_dir: Path) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(QWEN2_5_VL_SPECIAL_TOKENS, QWEN2_5_VL_CHAT_TEMPLATE)
    ids = token_ids(tokenizer, QWEN2_5_VL_SPECIAL_TOKENS)
    text = _qwen_text(
        tokenizer,
        ids,
        max_window_layers=2,
        use_sliding_window=False,
        sliding_window=32768,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        max_position_embeddings=128000,
    )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "hidden_act": "silu",
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "tokens_per_second": 2,
        "in_chans": 3,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **_qwen_token_ids(ids),
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    model = init_model(Qwen2_5_VLForConditionalGeneration, config)
    zero_unused_vocab_rows(model, len(tokenizer))
    pixels = {"min_pixels": 56 * 56, "max_pixels": 448 * 448}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    save_model(out_dir, model, processor, tokenizer, gen)


def build_qwen3_vl(out_dir: Path) -> None:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = qwen_tokenizer(QWEN3_VL_SPECIAL_TOKENS, QWEN3_VL_CHAT_TEMPLATE)
    ids = token_ids(tokenizer, QWEN3_VL_SPECIAL_TOKENS)
    text = _qwen_text(
        tokenizer,
        ids,
        head_dim=16,
        rope_scaling={
            "rope_type": "default",
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
        max_position_embeddings=262144,
        rope_theta=5000000.0,
        attention_bias=False,
    )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 144,  # a square: 12x12 learned positions, interpolated
        "deepstack_visual_indexes": [0],
        "in_channels": 3,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        **_qwen_token_ids(ids),
        tie_word_embeddings=False,
    )
    model = init_model(Qwen3VLForConditionalGeneration, config)
    zero_unused_vocab_rows(model, len(tokenizer))
    # Qwen3-VL's processors give the pixel bounds as size.shortest_edge/longest_edge.
    image_size = {"shortest_edge": 64 * 64, "longest_edge": 512 * 512}
    video_size = {"shortest_edge": 64 * 64, "longest_edge": 256 * 256 * 8}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=image_size,
            min_pixels=image_size["shortest_edge"],
            max_pixels=image_size["longest_edge"],
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        video_processor=Qwen3VLVideoProcessor(size=video_size, patch_size=16),
        tokenizer=tokenizer,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    gen = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
    save_model(out_dir, model, processor, tokenizer, gen)


# --- Gemma 3


def build_gemma3(out_dir: Path) -> None:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        GemmaTokenizerFast,
    )

    tok = with_bos(train_bpe(GEMMA3_SPECIAL_TOKENS, qwen_style=False, unk="<unk>"), "<bos>")
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        additional_special_tokens=GEMMA3_SPECIAL_TOKENS[5:],
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        chat_template=GEMMA3_CHAT_TEMPLATE,
        model_max_length=131072,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    ids = token_ids(tokenizer, GEMMA3_SPECIAL_TOKENS)
    image_size, patch, mm_tokens = 56, 14, 4  # 4x4 patches pooled 2x2 to 4 tokens
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 512,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 131072,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "bos_token_id": ids["<bos>"],
        "eos_token_id": ids["<eos>"],
        "pad_token_id": ids["<pad>"],
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch,
        "vision_use_head": False,
    }
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    model = init_model(Gemma3ForConditionalGeneration, config)
    zero_unused_vocab_rows(model, len(tokenizer))
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": image_size, "width": image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
            resample=2,
        ),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens,
    )
    gen = {
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "pad_token_id": ids["<pad>"],
    }
    save_model(out_dir, model, processor, tokenizer, gen)


# --- LLaVA-NeXT


def _llava_parts(tokenizer: Any, ids: dict[str, int], image_size: int) -> tuple[Any, Any]:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    return vision, text


# Small-image version of the real grid [[336,672],[672,336],[672,672],[1008,336],[336,1008]].
LLAVA_NEXT_BASE = 56
LLAVA_NEXT_GRID = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]


def build_llava_next(out_dir: Path) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = llama_tokenizer(LLAVA_NEXT_SPECIAL_TOKENS, LLAVA_NEXT_CHAT_TEMPLATE, ["<image>"])
    ids = token_ids(tokenizer, LLAVA_NEXT_SPECIAL_TOKENS)
    base = LLAVA_NEXT_BASE
    vision, text = _llava_parts(tokenizer, ids, base)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=LLAVA_NEXT_GRID,
        image_seq_length=(base // 14) ** 2,
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    model = init_model(LlavaNextForConditionalGeneration, config)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": base},
            crop_size={"height": base, "width": base},
            image_grid_pinpoints=LLAVA_NEXT_GRID,
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    gen = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    save_model(out_dir, model, processor, tokenizer, gen)


def build_llava_next_video(out_dir: Path) -> None:
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    tokenizer = llama_tokenizer(
        LLAVA_NEXT_VIDEO_SPECIAL_TOKENS, LLAVA_NEXT_VIDEO_CHAT_TEMPLATE, ["<image>", "<video>"]
    )
    ids = token_ids(tokenizer, LLAVA_NEXT_VIDEO_SPECIAL_TOKENS)
    base = LLAVA_NEXT_BASE
    vision, text = _llava_parts(tokenizer, ids, base)
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=LLAVA_NEXT_GRID,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        image_seq_length=(base // 14) ** 2,
        video_seq_length=(base // 14 // 2) ** 2,
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    model = init_model(LlavaNextVideoForConditionalGeneration, config)
    crop = {"height": base, "width": base}
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": base}, crop_size=crop),
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": base}, crop_size=crop, image_grid_pinpoints=LLAVA_NEXT_GRID
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_VIDEO_CHAT_TEMPLATE,
    )
    gen = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    save_model(out_dir, model, processor, tokenizer, gen)
