"""A random-weight Whisper (transformers' WhisperForConditionalGeneration), built offline.

It exists so that the speech-recognition export, OpenVINO GenAI's WhisperPipeline and
the transcription endpoints run end to end without downloading anything. Its
transcripts are random text.

- ``size="tiny"``: a 64-wide, two-layer model; builds in seconds.
- ``size="small"``: the shapes of whisper-small (768 wide, 12 + 12 layers, the full
  vocabulary), so that it costs the compute of the real model; for benchmarks only.

The tokenizer is a byte-level BPE trained on the built-in text of
utils.models.tiny_common, followed by Whisper's special tokens in Whisper's order:
`<|endoftext|>`, `<|startoftranscript|>`, one token per language, the task tokens,
`<|notimestamps|>` and the timestamps `<|0.00|>` to `<|30.00|>`.

This module is kept apart from the vision-language builders (utils.models.naming hashes
those), so that changing it does not rebuild them. torch and transformers are imported
inside functions.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from utils.models.tiny_common import build_atomically, init_model, source_hash, train_bpe

WhisperSize = Literal["tiny", "small"]

# Embedded speech-recognition model name -> size.
EMBEDDED_ASR_MODELS: dict[str, WhisperSize] = {
    "embedded/tiny-whisper": "tiny",
    "embedded/random-whisper-small": "small",
}

ENDOFTEXT = "<|endoftext|>"
# The number of 20 ms timestamp tokens Whisper has: <|0.00|> .. <|30.00|>.
TIMESTAMPS = 1501
_SHAPES: dict[WhisperSize, dict[str, int]] = {
    "tiny": {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
    },
    "small": {
        "d_model": 768,
        "encoder_layers": 12,
        "decoder_layers": 12,
        "encoder_attention_heads": 12,
        "decoder_attention_heads": 12,
        "encoder_ffn_dim": 3072,
        "decoder_ffn_dim": 3072,
    },
}
# Tokens per 30 s window at most. A random decoder never writes <|endoftext|>, so it
# always writes this many: the tiny model's transcripts are kept short (tests run
# many), the small one's as long as a window of ordinary speech.
MAX_LENGTH: dict[WhisperSize, int] = {"tiny": 40, "small": 128}
# whisper-small's vocabulary; the tiny model keeps only what its tokenizer has.
SMALL_VOCAB_SIZE = 51865


def builder_hash() -> str:
    """Hash of this builder: the export cache key of the embedded Whisper models follows it."""
    return source_hash(("tiny_whisper.py", "tiny_common.py", "asr_export.py"))


def special_tokens() -> list[str]:
    """Whisper's special tokens after `<|endoftext|>`, in Whisper's order."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return [
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *(f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)),
    ]


def _tokenizer(workdir: Path) -> Any:
    from transformers import WhisperTokenizer, WhisperTokenizerFast

    bpe = train_bpe([], qwen_style=False)  # <|endoftext|> follows the text tokens
    bpe.model.save(str(workdir))  # vocab.json and merges.txt
    slow = WhisperTokenizer(
        vocab_file=str(workdir / "vocab.json"),
        merges_file=str(workdir / "merges.txt"),
        unk_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=1024,
    )
    slow.add_special_tokens({"additional_special_tokens": special_tokens()})
    if slow.convert_tokens_to_ids(ENDOFTEXT) != len(slow.encoder):
        raise RuntimeError("<|endoftext|> must follow the text tokens, as in Whisper")
    slow.save_pretrained(workdir / "slow")
    return WhisperTokenizerFast.from_pretrained(workdir / "slow")


def _generation_config(tokenizer: Any, config: Any, size: WhisperSize) -> Any:
    from transformers import GenerationConfig
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    ids = tokenizer.convert_tokens_to_ids
    eot = ids(ENDOFTEXT)
    heads = config.decoder_attention_heads
    return GenerationConfig(
        do_sample=False,
        max_length=MAX_LENGTH[size],
        decoder_start_token_id=ids("<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[ids("Ġ"), eot],
        suppress_tokens=[],
        alignment_heads=[[config.decoder_layers - 1, h] for h in range(heads)],
        return_timestamps=False,
    )


def _build(out_dir: Path, size: WhisperSize) -> None:
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        tokenizer = _tokenizer(Path(scratch))
    vocab = len(tokenizer) if size == "tiny" else max(len(tokenizer), SMALL_VOCAB_SIZE)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        **_SHAPES[size],
    )
    model = init_model(WhisperForConditionalGeneration, config)
    # Text tokens only: the random decoder then writes words, and its transcripts end at
    # the length limit, not at a special token it happened to pick first.
    with torch.no_grad():
        model.get_input_embeddings().weight[eot:].mul_(0.0)
    model.generation_config = _generation_config(tokenizer, config, size)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer)
    processor.save_pretrained(out_dir)
    (out_dir / "embedded_model.json").write_text(json.dumps({"size": size}))


def build_tiny_whisper(out_dir: Path, *, size: WhisperSize = "tiny") -> Path:
    """Build a random-weight Whisper directory at `out_dir` (deterministic, offline).

    An existing `out_dir` is replaced. Returns `out_dir`.
    """
    return build_atomically(out_dir, lambda tmp: _build(tmp, size), f"Whisper ({size})")
