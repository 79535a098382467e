"""Shared pieces of the embedded model builders: a byte-level BPE tokenizer trained on
a built-in text, seeded, deterministic weights, the build into a directory that is
whole or absent, and the hash of the builders' code (their cache key follows it).

torch and tokenizers are imported inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SEED = 1234
VOCAB_SIZE = 1000

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


def train_bpe(special_tokens: list[str], *, qwen_style: bool, unk: str | None = None) -> Any:
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

    tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=False))
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


def with_bos(tok: Any, bos: str) -> Any:
    """Makes the tokenizer prepend `bos` (as Llama / Mistral / Gemma tokenizers do)."""
    from tokenizers import processors

    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return tok


def qwen_tokenizer(special: list[str], template: str) -> Any:
    """A Qwen2 byte-level BPE tokenizer (no BOS, eos <|im_end|>) with `special` tokens."""
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=train_bpe(special, qwen_style=True),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=special[1:],
        chat_template=template,
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.padding_side = "left"
    return tokenizer


def llama_tokenizer(special: list[str], template: str, extra: list[str]) -> Any:
    """A Llama-style tokenizer that prepends <s>, with <unk> <s> </s> <pad>."""
    from transformers import LlamaTokenizerFast

    tok = with_bos(train_bpe(special, qwen_style=False, unk="<unk>"), "<s>")
    return LlamaTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=extra,
        chat_template=template,
        model_max_length=32768,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )


def token_ids(tokenizer: Any, tokens: list[str]) -> dict[str, int]:
    return {t: int(tokenizer.convert_tokens_to_ids(t)) for t in tokens}


def zero_unused_vocab_rows(model: Any, used: int) -> None:
    """Zeroes embedding rows past the small vocabulary, so greedy decoding stays in it."""
    import torch

    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and module.weight.shape[0] > used:
                module.weight[used:].zero_()


def init_model(cls: Any, config: Any, dtype: Any = None) -> Any:
    """`cls(config)` with seeded random weights in `dtype` (float32 by default)."""
    import torch

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def save_model(
    out_dir: Path, model: Any, processor: Any, tokenizer: Any, gen: dict[str, Any]
) -> None:
    """Writes the model (greedy generation config `gen`), processor and tokenizer."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(do_sample=False, **gen)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def source_hash(names: tuple[str, ...]) -> str:
    """Hash of the modules `names` of this package: a change gives new cache keys."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in names:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def build_atomically(out_dir: Path, build: Callable[[Path], None], what: str) -> Path:
    """Runs `build` into a temporary sibling of `out_dir`, then moves it in place (an
    existing `out_dir` is replaced), so `out_dir` is either whole or absent."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "built random-weight %s in %s in %.1f s", what, out_dir, time.perf_counter() - started
    )
    return out_dir
