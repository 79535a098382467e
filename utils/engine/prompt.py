"""From a GenerationRequest to what the pipeline takes: the prompt through the chat
template, tensors, the context check and the GenerationConfig."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from utils.engine.model_config import ModelConfig
from utils.engine.tags import TAG_RE, tag_refs
from utils.engine.types import GenerationRequest, SamplingParams
from utils.engine.visual_tokens import MediaRefused, Visual, VisualTokenCounter

logger = logging.getLogger(__name__)


class RequestError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


# A chat template that reads the `tools` variable can render tool definitions.
_TEMPLATE_TOOLS = re.compile(r"\btools\b")


@dataclass
class Prepared:
    prompt: str
    images: list[Any]
    videos: list[Any]
    config: Any  # openvino_genai.GenerationConfig
    params: SamplingParams
    prompt_tokens: int  # 0 until counted
    replicate: int  # greedy n > 1: one sequence, copied to n choices
    visual_tokens: int = 0
    media: list[Visual] = field(default_factory=list)  # of images, then videos
    videos_metadata: list[Any] | None = None  # openvino_genai.VideoMetadata per video

    def media_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments of add_request / generate for the media."""
        return {"videos_metadata": self.videos_metadata} if self.videos_metadata else {}


class Preparer:
    """Chat template, input checks, context check and generation config."""

    def __init__(
        self, ov: Any, genai: Any, tokenizer: Any, model_dir: Path, model: ModelConfig
    ) -> None:
        self.ov = ov
        self.genai = genai
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir)
        self.model_type = model.model_type
        self.max_context = model.max_context
        self.visual = VisualTokenCounter.for_model(model)
        self.video_native = model.supports_video
        self.base_config_path = self.model_dir / "generation_config.json"
        self.eos_token_id = int(tokenizer.get_eos_token_id())
        self.leading_bos = self._added_bos(tokenizer)
        self.template_takes_tools = bool(_TEMPLATE_TOOLS.search(str(tokenizer.chat_template)))

    @staticmethod
    def _added_bos(tokenizer: Any) -> str:
        """The BOS text when the tokenizer adds BOS itself (Gemma, Llama-style), else ""."""
        try:
            bos_id = int(tokenizer.get_bos_token_id())
            bos = str(tokenizer.get_bos_token())
            ids = tokenizer.encode("a").input_ids.data.ravel().tolist()
        except Exception:  # a tokenizer without BOS
            return ""
        return bos if bos and bos_id >= 0 and ids[:1] == [bos_id] else ""

    def prepare(self, request: GenerationRequest) -> Prepared:
        params = request.params
        images, videos = request.images, request.videos
        self._check_tags(request.messages, len(images), len(videos))
        if videos and not self.video_native:
            raise RequestError(
                400, f"Model type {self.model_type} does not take video input.", "invalid_media"
            )
        fps = [float(f) for f in request.video_fps] + [0.0] * len(videos)
        try:
            media = [self.visual.image(img.shape) for img in images]
            media += [self.visual.video(vid.shape, fps[i]) for i, vid in enumerate(videos)]
        except MediaRefused as exc:
            raise RequestError(400, str(exc), "invalid_media") from exc
        prompt = self._render(request)
        if self.leading_bos and prompt.startswith(self.leading_bos):
            # the tokenizer adds BOS itself: a template's own would make two
            prompt = prompt[len(self.leading_bos) :]
        visual = sum(m.tokens for m in media)
        prompt_tokens = 0  # counted later, unless the prompt may come near the context
        # Tokenizing costs more than the rest of the preparation; a token has at least
        # one byte, so a prompt whose bytes fit with room to spare needs no count yet.
        text_bytes = sum(len(m.text.encode()) + len(m.separate_text.encode()) for m in media)
        upper = len(prompt.encode()) + text_bytes + visual + 8
        if upper + params.max_new_tokens > self.max_context:
            prompt_tokens = self.count(prompt, media, len(images))
            if prompt_tokens >= self.max_context:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {self.max_context} tokens. "
                    f"However, your messages resulted in {prompt_tokens} tokens ({visual} of "
                    "them for images and videos). Please reduce the length of the messages "
                    "or media.",
                    "context_length_exceeded",
                )
        used = prompt_tokens or upper
        max_new = max(1, min(params.max_new_tokens, self.max_context - used))
        config, replicate = self._generation_config(params, max_new)
        if params.pruning_ratio:  # the count above is of the tokens before pruning
            prompt_tokens = 0
        return Prepared(
            prompt=prompt,
            images=[self.ov.Tensor(np.ascontiguousarray(img, dtype=np.uint8)) for img in images],
            videos=[self.ov.Tensor(np.ascontiguousarray(vid, dtype=np.uint8)) for vid in videos],
            config=config,
            params=params,
            prompt_tokens=prompt_tokens,
            replicate=replicate,
            visual_tokens=visual,
            media=media,
            videos_metadata=self._videos_metadata(videos, fps),
        )

    def _render(self, request: GenerationRequest) -> str:
        if not request.tools:
            return str(
                self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
            )
        if not self.template_takes_tools:
            raise RequestError(
                400,
                f"'tools' cannot be used with this model: its chat template ({self.model_type}) "
                "has no tool support.",
                "unsupported_parameter",
                param="tools",
            )
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    request.messages, add_generation_prompt=True, tools=request.tools
                )
            )
        except Exception as exc:  # the template refused the conversation
            raise RequestError(
                400, f"The chat template could not render the tools: {exc}", param="tools"
            ) from exc

    def _videos_metadata(self, videos: list[Any], fps: list[float]) -> list[Any] | None:
        """Qwen3-VL samples a video's frames again unless told which to keep: keep all
        the frames the server decoded, at their frame rate."""
        if not videos or self.model_type != "qwen3_vl":
            return None
        metadata = []
        for i, video in enumerate(videos):
            meta = self.genai.VideoMetadata()
            meta.frames_indices = list(range(int(video.shape[0])))
            if fps[i] > 0:
                meta.fps = fps[i]
            metadata.append(meta)
        return metadata

    def count(self, prompt: str, media: list[Visual], n_images: int) -> int:
        """Prompt tokens with visual tokens, as the pipeline will see them; `media` are
        the images' then the videos' Visuals."""

        def text_of(match: re.Match[str]) -> str:
            index = int(match.group(2)) + (n_images if match.group(1) == "video" else 0)
            return media[index].text if index < len(media) else ""

        text = TAG_RE.sub(text_of, prompt)
        tokens = self._tokens(text) + sum(m.tokens for m in media)
        separate = [m.separate_text for m in media if m.separate_text]
        return tokens + sum(self._tokens(t, special=False) for t in separate)

    def _tokens(self, text: str, *, special: bool = True) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=special).input_ids
        return int(ids.get_shape()[1])

    def prompt_tokens(self, prep: Prepared) -> int:
        if not prep.prompt_tokens:
            n_images = len(prep.images)
            prep.prompt_tokens = self.count(prep.prompt, prep.media, n_images)
        return prep.prompt_tokens

    @staticmethod
    def _check_tags(messages: list[dict[str, str]], n_images: int, n_videos: int) -> None:
        for message in messages:
            for kind, index in tag_refs(str(message.get("content", ""))):
                limit = n_images if kind == "image" else n_videos
                if index >= limit:
                    raise RequestError(
                        400, f"The prompt refers to {kind} {index}, which was not given."
                    )

    def _generation_config(self, params: SamplingParams, max_new: int) -> tuple[Any, int]:
        genai = self.genai
        if self.base_config_path.exists():
            cfg = genai.GenerationConfig(str(self.base_config_path))
        else:
            cfg = genai.GenerationConfig()
        if cfg.eos_token_id < 0 and self.eos_token_id >= 0:
            cfg.set_eos_token_id(self.eos_token_id)
        cfg.apply_chat_template = False
        cfg.max_new_tokens = max_new
        cfg.min_new_tokens = min(params.min_new_tokens, max_new)
        cfg.ignore_eos = params.ignore_eos
        cfg.repetition_penalty = params.repetition_penalty
        cfg.presence_penalty = params.presence_penalty
        cfg.frequency_penalty = params.frequency_penalty
        cfg.num_beams = 1
        if params.logprobs:
            cfg.logprobs = 1  # the chosen token's; GenAI computes no alternatives
        if params.pruning_ratio:
            cfg.pruning_ratio = params.pruning_ratio
        replicate = 1
        greedy = params.temperature <= 1e-5
        if greedy:
            cfg.do_sample = False
            cfg.num_return_sequences = 1
            replicate = params.n
        else:
            cfg.do_sample = True
            cfg.temperature = params.temperature
            cfg.top_p = params.top_p
            if params.top_k > 0:
                cfg.top_k = params.top_k
            cfg.rng_seed = params.seed
            cfg.num_return_sequences = params.n
        if params.json_schema:
            cfg.structured_output_config = genai.StructuredOutputConfig(
                json_schema=params.json_schema
            )
        try:
            cfg.validate()
        except Exception as exc:
            raise RequestError(400, f"Invalid generation parameters: {exc}") from exc
        return cfg, replicate
