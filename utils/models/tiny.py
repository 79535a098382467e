"""Random-weight vision-language models in real Hugging Face architectures, built offline.

They exist so that the export step, the OpenVINO pipelines and the HTTP server can run
end to end without downloading anything: the default quick-start model and every test
use them. Their answers are random text.

- ``size="tiny"``: a few hundred kilobytes of weights, builds in seconds.
Families: Qwen2-VL and LLaVA-1.5 here; Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA-NeXT and
LLaVA-NeXT-Video in utils.models.tiny_families (tokenizer and weight helpers in
tiny_common, special tokens and chat templates in tiny_templates).

- ``size="2b"`` (Qwen2-VL only): the shapes of Qwen2-VL-2B, so that it costs the same
  compute as the real model; for benchmarks, never for tests.

The tokenizer is a byte-level BPE trained on a built-in text, with the special tokens and
chat template of the real model family; unused rows of a large embedding are zero so that
greedy decoding stays inside the small vocabulary.

torch, transformers and tokenizers are imported inside functions: importing this module
stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from utils.models.tiny_common import (
    build_atomically,
    init_model,
    qwen_tokenizer,
    train_bpe,
    zero_unused_vocab_rows,
)
from utils.models.tiny_templates import (
    LLAVA_CHAT_TEMPLATE,
    LLAVA_SPECIAL_TOKENS,
    QWEN2VL_CHAT_TEMPLATE,
    QWEN2VL_SPECIAL_TOKENS,
)

ModelKind = Literal[
    "qwen2-vl", "llava", "qwen2.5-vl", "qwen3-vl", "gemma3", "llava-next", "llava-next-video"
]
ModelSize = Literal["tiny", "2b"]
KINDS: tuple[ModelKind, ...] = (
    "qwen2-vl",
    "llava",
    "qwen2.5-vl",
    "qwen3-vl",
    "gemma3",
    "llava-next",
    "llava-next-video",
)


def _qwen2vl_tokenizer() -> Any:
    return qwen_tokenizer(QWEN2VL_SPECIAL_TOKENS, QWEN2VL_CHAT_TEMPLATE)


def _llava_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(LLAVA_SPECIAL_TOKENS, qwen_style=False, unk="<unk>"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def qwen2vl_config(tokenizer: Any, size: ModelSize) -> tuple[Any, Any]:
    """The Qwen2-VL config of `size` for `tokenizer`, and the torch dtype of its weights."""
    import torch
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    if size == "tiny":
        text: dict[str, Any] = {
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_window_layers": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "tie_word_embeddings": False,
        }
        vision: dict[str, Any] = {
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
        }
        dtype = torch.float32
    else:  # Qwen2-VL-2B-Instruct shapes
        text = {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_window_layers": 28,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True,
        }
        vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16}
        dtype = torch.bfloat16
    text.update(
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        use_sliding_window=False,
        sliding_window=32768,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision.update(
        hidden_act="quick_gelu",
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )
    return config, dtype


def _build_qwen2vl(out_dir: Path, size: ModelSize) -> None:
    from transformers import (
        GenerationConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _qwen2vl_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    config, dtype = qwen2vl_config(tokenizer, size)
    model = init_model(Qwen2VLForConditionalGeneration, config, dtype)
    zero_unused_vocab_rows(model, len(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )

    # The tiny model sees small images; the 2B one has the real model's limits.
    pixels: dict[str, Any] = {"min_pixels": 56 * 56, "max_pixels": 448 * 448}
    if size == "2b":
        pixels = {"min_pixels": 56 * 56, "max_pixels": 14 * 14 * 4 * 16384}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _build_llava(out_dir: Path, size: ModelSize) -> None:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if size != "tiny":
        raise ValueError("only size='tiny' exists for llava")
    tokenizer = _llava_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL_TOKENS}
    image_size, patch = 56, 14
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2,
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    model = init_model(LlavaForConditionalGeneration, config, torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        do_sample=False,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _builders() -> dict[str, Callable[[Path, ModelSize], None]]:
    from utils.models import tiny_families as f

    def tiny_only(build: Callable[[Path], None]) -> Callable[[Path, ModelSize], None]:
        return lambda out_dir, size: build(out_dir)

    return {
        "qwen2-vl": _build_qwen2vl,
        "llava": _build_llava,
        "qwen2.5-vl": tiny_only(f.build_qwen2_5_vl),
        "qwen3-vl": tiny_only(f.build_qwen3_vl),
        "gemma3": tiny_only(f.build_gemma3),
        "llava-next": tiny_only(f.build_llava_next),
        "llava-next-video": tiny_only(f.build_llava_next_video),
    }


def build_tiny_model(kind: ModelKind, out_dir: Path, *, size: ModelSize = "tiny") -> Path:
    """Build a random-weight Hugging Face model directory of `kind` at `out_dir`.

    The build is deterministic (fixed seeds) and needs no network. An existing
    `out_dir` is replaced. Returns `out_dir`.
    """
    builders = _builders()
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(KINDS)}")
    if size != "tiny" and kind != "qwen2-vl":
        raise ValueError(f"only size='tiny' exists for {kind}")
    return build_atomically(out_dir, lambda tmp: builders[kind](tmp, size), f"{kind} ({size})")
