"""What the API process knows of the engine before it starts: the model's public
description, and the configuration the engine process is started with."""

from __future__ import annotations

from pathlib import Path

from utils.devices import engine_properties
from utils.engine.messages import WorkerConfig
from utils.engine.model_config import ModelConfig
from utils.engine.types import ModelInfo
from utils.settings import Settings


def model_info(settings: Settings, model_dir: Path, model: ModelConfig) -> ModelInfo:
    return ModelInfo(
        name=settings.public_model_name,
        model_type=model.model_type,
        path=str(model_dir),
        supports_video=model.supports_video,
        max_context=model.max_context,
        model=model,
    )


def worker_config(settings: Settings, model_dir: Path, model: ModelConfig) -> WorkerConfig:
    return WorkerConfig(
        model_dir=str(model_dir),
        model=model,
        device=settings.device,
        engine=settings.engine,
        ov_config=engine_properties(settings),
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        kv_cache_size_gb=settings.kv_cache_size_gb,
        kv_cache_blocks=settings.kv_cache_blocks,
        enable_prefix_caching=settings.enable_prefix_caching,
        log_level=settings.log_level,
        stream_interval_s=settings.stream_interval_ms / 1000,
    )
