"""The server's settings: one class, read from VLM_* environment variables and .env.

Every field has a default and a description; README's settings table lists the
same variables (tests/test_settings_doc.py keeps the two in agreement).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VLM_",
        env_file=".env",
        extra="ignore",
        protected_namespaces=(),
        validate_default=True,
    )

    # --- model and export -------------------------------------------------
    model_name: str = Field(
        "embedded/tiny-qwen2-vl",
        description="Hugging Face model id or local directory to serve. "
        "`embedded/tiny-qwen2-vl` and `embedded/tiny-llava` are tiny random-weight "
        "models built offline (their answers are random text).",
    )
    served_model_name: str | None = Field(
        None,
        description="Name reported by /v1/models and accepted in requests "
        "(default: VLM_MODEL_NAME).",
    )
    model_cache_dir: Path = Field(
        Path("models"), description="Directory that holds exported OpenVINO IR models."
    )
    compression_weight_format: Literal["int4", "int8", "fp16"] = Field(
        "int4", description="Weight format of the exported language model."
    )
    compression_group_size: int = Field(
        128, ge=-1, description="int4 group size (-1: per channel)."
    )
    compression_ratio: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of int4 layers (the rest are int8)."
    )
    compression_sym: bool = Field(False, description="Symmetric int4/int8 quantization.")
    trust_remote_code: bool = Field(
        False, description="Allow model repositories that ship their own Python code."
    )

    # --- device -----------------------------------------------------------
    device: str = Field(
        "CPU", description="OpenVINO device: CPU, GPU, GPU.N, AUTO, HETERO:..., MULTI:..."
    )
    ov_config: dict[str, Any] = Field(
        default_factory=dict,
        description='Extra OpenVINO properties as JSON, e.g. {"PERFORMANCE_HINT": "LATENCY"}.',
    )
    cpu_runtime_cache_capacity: int = Field(
        100,
        ge=0,
        description="Entries the CPU plugin keeps per kind of kernel made for a new input "
        "shape (OpenVINO's CPU_RUNTIME_CACHE_CAPACITY, 5000 by default): continuous batching "
        "makes a new shape at almost every step, and a large cache keeps the engine's memory "
        "growing for hours. VLM_OV_CONFIG overrides it.",
    )
    compiled_cache_dir: Path | None = Field(
        None,
        description="OpenVINO CACHE_DIR for compiled models, on any device (default: "
        "<model_cache_dir>/compiled when VLM_DEVICE names a GPU, none otherwise).",
    )

    # --- server -----------------------------------------------------------
    host: str = Field("0.0.0.0", description="Address the server listens on.")
    port: int = Field(
        8000, ge=1, le=65535, description="Port the server listens on (alias: VLM_SERVICE_PORT)."
    )
    service_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Alias of VLM_PORT, the name comparable deployments use; giving both "
        "with different values is an error.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    api_keys: CsvList = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, every route but /health needs "
        "`Authorization: Bearer <key>`.",
    )
    cors_origins: CsvList = Field(
        default_factory=list,
        description="Comma-separated origins allowed by CORS (off when empty).",
    )

    # --- generation defaults ----------------------------------------------
    seed: int = Field(42, description="Sampling seed used when a request gives none.")
    default_max_tokens: int = Field(
        512, ge=1, description="Output token limit when a request gives none."
    )

    # --- engine and scheduling --------------------------------------------
    engine: Literal["auto", "continuous_batching", "vlm_pipeline"] = Field(
        "auto",
        description="Inference engine; auto uses continuous batching and falls back to "
        "VLMPipeline for models it cannot run.",
    )
    max_queue: int = Field(
        64, ge=1, description="Requests waiting or running at once; more get 429."
    )
    max_num_seqs: int = Field(16, ge=1, description="Sequences batched together per step.")
    max_num_batched_tokens: int = Field(
        2048, ge=64, description="Tokens processed per scheduler step."
    )
    kv_cache_size_gb: int = Field(
        2,
        ge=1,
        description="KV cache size in whole GB (continuous batching). It is allocated at "
        "start and becomes resident as it is first used, so the engine's memory grows "
        "toward this size under load and then stays there.",
    )
    kv_cache_blocks: int | None = Field(
        None,
        ge=1,
        description="Exact KV cache size in blocks, overriding VLM_KV_CACHE_SIZE_GB "
        "(for small memory budgets and soak tests).",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of a shared prompt prefix across requests."
    )
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="Longest time one request may wait and run."
    )
    engine_stall_timeout_s: float = Field(
        30.0,
        ge=0.0,
        description="The engine process is taken as stalled, failed and restarted when "
        "it has requests and neither finished a step nor used CPU time for this long "
        "(a long prefill uses CPU time and is not a stall); 0 turns the watchdog off.",
    )
    engine_max_restarts: int = Field(
        5,
        ge=0,
        description="Engine restarts in a row, with no generation served in between, "
        "before the server stops trying and reports the model as failed in /ready.",
    )
    stream_interval_ms: float = Field(
        20.0,
        ge=0.0,
        description="Shortest time between two streamed pieces of one answer: tokens "
        "generated faster are sent together (the first one at once); 0 sends every token.",
    )

    # --- media and limits -------------------------------------------------
    max_images_per_request: int = Field(16, ge=0, description="Images allowed in one request.")
    max_videos_per_request: int = Field(2, ge=0, description="Videos allowed in one request.")
    max_video_frames: int = Field(32, ge=1, description="Frames sampled from one video at most.")
    video_fps: float = Field(1.0, gt=0.0, description="Default frame sampling rate of video_url.")
    image_cache_mb: int = Field(
        256,
        ge=0,
        description="Memory for decoded images kept for reuse, by a hash of their bytes "
        "(a conversation sends its images again every turn); 0 turns the cache off.",
    )
    image_max_pixels: int = Field(
        1024 * 1024,
        ge=28 * 28,
        description="The server's cap on an image's pixels: images are downscaled to fit "
        "it, whatever their `detail` or `max_pixels`. It is also `detail: high` (unless "
        "the model's own largest input is smaller).",
    )
    image_detail_low_tokens: int = Field(
        256,
        ge=1,
        description="Visual tokens of an image sent with `detail: low`, whatever its size "
        "(turned into pixels per model family; fixed-cost families such as LLaVA-1.5 and "
        "Gemma 3 are unaffected).",
    )
    image_detail_auto_tokens: int | None = Field(
        None,
        ge=1,
        description="Visual tokens of an image sent with `detail: auto` or none (default: "
        "576 on CPU, the same as `high` on other devices).",
    )
    max_visual_tokens: int = Field(
        16384,
        ge=1,
        description="Visual tokens of all images and videos of one request at most; a "
        "request over it gets a 400 that says what to lower.",
    )
    visual_token_pruning_ratio: int = Field(
        0,
        ge=0,
        le=99,
        description="Percent of visual tokens OpenVINO GenAI prunes (CDPruner) when a "
        "request gives no `pruning_ratio`; 0 is off. Applies to Qwen-VL models with "
        "VLM_ENGINE=vlm_pipeline only, and is ignored (with a log line) elsewhere.",
    )
    video_max_pixels: int = Field(
        360 * 420, ge=28 * 28, description="Video frames are downscaled to fit this many pixels."
    )
    max_decoded_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height) accepted for decoding."
    )
    max_media_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest single image or video download, in bytes."
    )
    max_request_media_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Largest total media per request, in bytes."
    )
    max_body_bytes: int = Field(
        96 * 1024 * 1024, ge=1024, description="Largest request body, in bytes."
    )
    media_connect_timeout_s: float = Field(5.0, gt=0.0, description="Media URL connect timeout.")
    media_timeout_s: float = Field(30.0, gt=0.0, description="Media URL total download timeout.")
    media_allowed_domains: CsvList = Field(
        default_factory=list,
        description="If set, media URLs must be on these domains (or their subdomains).",
    )
    media_allow_private_networks: bool = Field(
        False, description="Allow media URLs that resolve to loopback or private addresses."
    )
    media_local_dir: Path | None = Field(
        None, description="If set, file:// media URLs may read files under this directory."
    )

    # --- speech -----------------------------------------------------------
    asr_model: str | None = Field(
        None,
        description="Whisper model (Hugging Face id or local directory) that serves "
        "/v1/audio/transcriptions and /v1/audio/translations; unset: no speech endpoints. "
        "`embedded/tiny-whisper` is a tiny random-weight Whisper built offline.",
    )
    asr_weight_format: Literal["fp16", "int8"] = Field(
        "fp16", description="Weight format of the exported Whisper model."
    )
    asr_niceness: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the speech engine's CPU priority is than the chat "
        "engine's (a nice increment): a transcription yields the cores to chat streams "
        "while both run, and runs at full speed alone. 0: the same priority.",
    )
    audio_max_duration_s: float = Field(
        1200.0, gt=0.0, description="Longest audio accepted (a file or a chat audio part)."
    )
    audio_max_channels: int = Field(
        8, ge=1, description="Most audio channels accepted (they are mixed down to mono)."
    )

    @field_validator("api_keys", "cors_origins", "media_allowed_domains", mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("device")
    @classmethod
    def _device_upper(cls, value: str) -> str:
        return value.strip().upper()  # OpenVINO device names are upper case

    @model_validator(mode="after")
    def _port_alias(self) -> Settings:
        return apply_port_alias(self)

    @property
    def public_model_name(self) -> str:
        return self.served_model_name or self.model_name


def apply_port_alias(settings: Settings) -> Settings:
    """VLM_SERVICE_PORT stands for VLM_PORT; the two naming different ports is refused."""
    alias = settings.service_port
    if alias is None:
        return settings
    if "port" in settings.model_fields_set and settings.port != alias:
        raise ValueError(
            f"VLM_PORT={settings.port} and VLM_SERVICE_PORT={alias} disagree: "
            "set one of them (VLM_SERVICE_PORT is an alias of VLM_PORT)"
        )
    settings.port = alias
    return settings


class SettingsLoadError(ValueError):
    """Settings that cannot be loaded, explained per VLM_* variable."""


def load_settings(**overrides: Any) -> Settings:
    """`Settings(**overrides)`, raising SettingsLoadError with one readable line per bad
    variable (e.g. `VLM_PORT='abc': Input should be a valid integer`) instead of
    pydantic's report."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if not error["loc"]:  # a check across settings names its variables itself
                lines.append(error["msg"].removeprefix("Value error, "))
                continue
            name = "VLM_" + "_".join(str(part) for part in error["loc"][:1]).upper()
            value = error.get("input")
            shown = value if isinstance(value, str) else json.dumps(value, default=str)
            lines.append(f"{name}={shown!r}: {error['msg']}")
        raise SettingsLoadError("invalid settings:\n  " + "\n  ".join(lines)) from None
    except SettingsError as exc:  # a value that had to be JSON and was not
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        hint = ' Expected a JSON object, e.g. {"PERFORMANCE_HINT": "LATENCY"}.'
        raise SettingsLoadError(
            f"VLM_{field.upper()} is not valid JSON ({exc.__cause__})."
            + (hint if field == "ov_config" else "")
        ) from None
