"""Random-weight vision-language models in real Hugging Face architectures, built offline.

They exist so that the export step, the OpenVINO pipelines and the HTTP server can run
end to end without downloading anything: the default quick-start model and every test
use them. Their answers are random text.

- ``size="tiny"``: a few hundred kilobytes of weights, builds in seconds.
- ``size="2b"`` (Qwen2-VL only): the shapes of Qwen2-VL-2B, so that it costs the same
  compute as the real model; for benchmarks, never for tests.

The tokenizer is a byte-level BPE trained on a built-in text, with the special tokens and
chat template of the real model family; unused rows of a large embedding are zero so that
greedy decoding stays inside the small vocabulary.

torch, transformers and tokenizers are imported inside functions: importing this module
stays cheap.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

ModelKind = Literal["qwen2-vl", "llava"]
ModelSize = Literal["tiny", "2b"]
KINDS: tuple[ModelKind, ...] = ("qwen2-vl", "llava")

SEED = 1234
VOCAB_SIZE = 1000

QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template of Qwen2-VL-Instruct: string content, or a list of text/image/video
# parts, each image becoming <|vision_start|><|image_pad|><|vision_end|>.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# LLaVA-1.5 style: "USER: <image>\n... ASSISTANT:", accepting string or list content.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] %}{% if 'text' in content %}"
    "{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if 'text' in content %}"
    "{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen2's pre-tokenization pattern (splits words, numbers, punctuation, whitespace).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (  # noqa: SIM905
    "the a an of to in and is are was were be this that these those it its on at by for "
    "with from as or not but if then than so what which who where when why how image "
    "picture photo video frame scene color red green blue yellow black white gray orange "
    "purple pink brown light dark bright small large big tiny left right top bottom "
    "center middle front back person people man woman child dog cat bird car bus tree "
    "house road sky water sea river mountain table chair cup book phone screen window "
    "door street city sun cloud grass flower animal food text sign number one two three "
    "four five six seven eight nine ten first second last describe show shows contains "
    "there here see look looks appear appears near next above below behind inside "
    "outside around between answer question please tell me you we they he she model "
    "server request response json name value true false null yes no hello world "
    "assistant user system open vision language token stream chat completion"
).split()


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """A deterministic English-like text with digits, punctuation and JSON."""
    text = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if i % 3 == 0:
            words[0] = words[0].capitalize()
        line = " ".join(words)
        match i % 5:
            case 0:
                line += f" {rng.randint(0, 9999)}."
            case 1:
                line = json.dumps({rng.choice(_WORDS): line, "n": rng.randint(0, 99)})
            case 2:
                line += "? " + ", ".join(rng.sample(_WORDS, 3)) + "!"
            case 3:
                line += f" ({rng.random():.3f}) - {line[:12]};"
            case _:
                line += ":\n\t" + line.upper()
        text.append(line)
    return text


def _train_bpe(special_tokens: list[str], *, qwen_style: bool) -> Any:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=None if qwen_style else "<unk>", byte_fallback=False))
    if qwen_style:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(random.Random(SEED)), trainer=trainer)
    return tok


def _qwen2vl_tokenizer() -> Any:
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=_train_bpe(QWEN2VL_SPECIAL_TOKENS, qwen_style=True),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN2VL_SPECIAL_TOKENS[1:],
        chat_template=QWEN2VL_CHAT_TEMPLATE,
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def _llava_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(LLAVA_SPECIAL_TOKENS, qwen_style=False),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _zero_unused_vocab_rows(model: Any, used: int) -> None:
    import torch

    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and module.weight.shape[0] > used:
                module.weight[used:].zero_()


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
    model = _init_model(Qwen2VLForConditionalGeneration, config, dtype)
    _zero_unused_vocab_rows(model, len(tokenizer))
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
    model = _init_model(LlavaForConditionalGeneration, config, torch.float32)
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


def _init_model(cls: Any, config: Any, dtype: Any) -> Any:
    import torch

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_tiny_model(kind: ModelKind, out_dir: Path, *, size: ModelSize = "tiny") -> Path:
    """Build a random-weight Hugging Face model directory of `kind` at `out_dir`.

    The build is deterministic (fixed seeds) and needs no network. An existing
    `out_dir` is replaced. Returns `out_dir`.
    """
    builders = {"qwen2-vl": _build_qwen2vl, "llava": _build_llava}
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        builders[kind](tmp, size)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "built random-weight %s (%s) in %s in %.1f s",
        kind,
        size,
        out_dir,
        time.perf_counter() - started,
    )
    return out_dir
