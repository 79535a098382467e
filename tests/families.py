"""The model families the suite runs end to end, and what it checks for each.

tests/test_families.py runs every check below on every family, in both OpenVINO GenAI
pipelines; scripts/models_table.py writes README's supported-models table from this
list (and from the checks the test module defines), so the table never claims more
than the suite runs.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("continuous_batching", "vlm_pipeline")


@dataclass(frozen=True)
class Refusal:
    """Media the engine cannot take for this family: the server answers 400 first."""

    what: str  # for the README
    image: tuple[int, int] | None = None  # (height, width)
    video_frames: int = 0  # a video of this many 64x64 frames


@dataclass(frozen=True)
class Family:
    kind: str  # utils.models.tiny kind; the embedded model is embedded/tiny-<kind>
    model_type: str  # config.json model_type
    title: str
    example: str  # a real checkpoint of the family
    context: int  # the tiny build's text_config.max_position_embeddings
    native_video: bool  # the pipeline takes videos=; otherwise frames go as images
    refusals: tuple[Refusal, ...] = ()

    @property
    def embedded(self) -> str:
        return f"embedded/tiny-{self.kind}"


_QWEN_ASPECT = Refusal("aspect ratio over 200:1", image=(4, 1000))
_LLAVA_NEXT_ELONGATED = Refusal("images too elongated for the anyres grid", image=(28, 4000))

FAMILIES = (
    Family("qwen2-vl", "qwen2_vl", "Qwen2-VL", "Qwen/Qwen2-VL-2B-Instruct", 32768, True,
           (_QWEN_ASPECT,)),
    Family("qwen2.5-vl", "qwen2_5_vl", "Qwen2.5-VL", "Qwen/Qwen2.5-VL-3B-Instruct", 128000,
           True, (_QWEN_ASPECT,)),
    Family("qwen3-vl", "qwen3_vl", "Qwen3-VL", "Qwen/Qwen3-VL-2B-Instruct", 262144, True,
           (_QWEN_ASPECT, Refusal("videos of one frame", video_frames=1))),
    Family("llava", "llava", "LLaVA-1.5", "llava-hf/llava-1.5-7b-hf", 4096, False),
    Family("llava-next", "llava_next", "LLaVA-NeXT", "llava-hf/llava-v1.6-mistral-7b-hf",
           32768, False, (_LLAVA_NEXT_ELONGATED,)),
    Family("llava-next-video", "llava_next_video", "LLaVA-NeXT-Video",
           "llava-hf/LLaVA-NeXT-Video-7B-hf", 32768, True, (_LLAVA_NEXT_ELONGATED,)),
    Family("gemma3", "gemma3", "Gemma 3", "google/gemma-3-4b-it", 131072, False),
)  # fmt: skip

FAMILY = {family.kind: family for family in FAMILIES}

# Families the engine runs only with their own Python code (trust_remote_code), which
# cannot be had offline: not in the suite.
REMOTE_CODE_FAMILIES = (
    ("InternVL2", "internvl_chat"),
    ("MiniCPM-V 2.6", "minicpmv"),
    ("Phi-3.5-vision", "phi3_v"),
    ("Phi-4-multimodal", "phi4mm"),
)

# What tests/test_families.py checks for every family, by test function; the README
# table says "tested" only with these (tests/test_models_table.py holds them equal).
CHECKS = {
    "test_one_image": "one image",
    "test_several_images": "several images",
    "test_images_across_turns": "images across turns",
    "test_video": "video",
    "test_refusals_are_400_before_the_engine_runs": "refusals",
    "test_context_check_at_its_boundary": "context check",
    "test_model_config_of_the_export": "context key",
    "test_http_streamed_and_not": "HTTP streamed and not",
    "test_http_refusals_are_400": "HTTP refusals",
}

# Model types refused at start-up (utils.models.support), for the README.
REFUSED_FAMILIES = (
    ("Qwen3-VL MoE", "qwen3_vl_moe"),
    ("Idefics3", "idefics3"),
    ("SmolVLM", "smolvlm"),
    ("Mistral 3", "mistral3"),
)
