"""Vision budgets (utils/media/budget.py): `detail`, an image's `max_pixels`, the
server's cap, the total visual tokens of a request, and visual-token pruning; the
arithmetic per family, then what the engine reports in `usage.prompt_tokens` on the
tiny models of every family."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from tests.families import FAMILIES, FAMILY
from tests.fixtures.models import tiny_model_ir
from tests.fixtures.server import LiveServers, data_url, make_image
from tests.test_families import served_model
from utils.api.validation import parse_request
from utils.engine.model_config import ModelConfig
from utils.engine.visual_tokens import VisualTokenCounter
from utils.errors import OpenAIError
from utils.media import budget
from utils.media.budget import ImageBudgets, check_visual_tokens, pruning_ratio
from utils.media.decode import fit_size
from utils.settings import Settings

# Budgets small enough for the tiny models (whose own largest input is 448x448 or
# 512x512): low 16 tokens, auto 36, and a cap of 224x224 pixels.
CAP = 224 * 224
BUDGETS = {"image_detail_low_tokens": 16, "image_detail_auto_tokens": 36, "image_max_pixels": CAP}
SIDE = 448  # the test image, larger than every budget
QWEN_KINDS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
FIXED_KINDS = ("llava", "gemma3")  # the same tokens whatever the image size


def model_of(kind: str) -> ModelConfig:
    return ModelConfig.read(tiny_model_ir(kind))


def tokens_at(kind: str, pixels: int, width: int = SIDE, height: int = SIDE) -> int:
    """Visual tokens of a width x height image downscaled to `pixels`."""
    w, h = fit_size(width, height, pixels)
    return VisualTokenCounter.for_model(model_of(kind)).image((h, w, 3)).tokens


# --------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("kind", [f.kind for f in FAMILIES])
def test_budget_arithmetic_per_family(kind: str) -> None:
    """Tokens -> pixels by the family's patch arithmetic; high is the model's own
    largest input or the cap, whichever is smaller."""
    budgets = ImageBudgets.for_model(model_of(kind), Settings(**BUDGETS))
    step = {"qwen2-vl": 28, "qwen2.5-vl": 28, "qwen3-vl": 32}.get(kind)
    if step is not None:  # one token per merged patch of step x step pixels
        assert (budgets.low, budgets.auto, budgets.high) == (16 * step**2, 36 * step**2, CAP)
        assert (tokens_at(kind, budgets.low), tokens_at(kind, budgets.auto)) == (16, 36)
        assert tokens_at(kind, budgets.high) == (224 // step) ** 2
    elif kind.startswith("llava-next"):  # one grid token per 14x14 patch; largest grid 112x112
        assert (budgets.low, budgets.auto, budgets.high) == (16 * 196, 36 * 196, 112 * 112)
        low, auto, high = (tokens_at(kind, p) for p in (budgets.low, budgets.auto, budgets.high))
        assert low <= auto <= high and low < high  # the grid moves in whole tiles
    else:
        assert kind in FIXED_KINDS
        assert budgets.low == budgets.auto == budgets.high == CAP


@pytest.mark.parametrize("kind", QWEN_KINDS)
@pytest.mark.parametrize("shape", [(1280, 720), (1920, 1080), (1080, 1920), (4000, 3000)])
def test_low_is_a_fixed_budget_whatever_the_size(kind: str, shape: tuple[int, int]) -> None:
    budgets = ImageBudgets.for_model(model_of(kind), Settings(**BUDGETS))
    assert 12 <= tokens_at(kind, budgets.pixels("low", None), *shape) <= 16


def test_a_client_cannot_exceed_the_cap() -> None:
    budgets = ImageBudgets.for_model(model_of("qwen2-vl"), Settings(**BUDGETS))
    huge = 10**9
    assert budgets.pixels(None, huge) == budgets.pixels("high", huge) == CAP
    assert budgets.pixels("auto", huge) == CAP
    assert budgets.pixels("low", huge) == budgets.low  # max_pixels never raises a detail
    assert budgets.pixels(None, 5000) == budgets.pixels("high", 5000) == 5000
    assert budgets.pixels(None, 1) == budget.MIN_PIXELS


def test_auto_defaults_per_device() -> None:
    model = model_of("qwen2-vl")
    cpu = ImageBudgets.for_model(model, Settings(device="CPU", image_max_pixels=10**7))
    gpu = ImageBudgets.for_model(model, Settings(device="GPU", image_max_pixels=10**7))
    assert cpu.auto == min(budget.CPU_AUTO_TOKENS * 28 * 28, cpu.high)
    assert gpu.auto == gpu.high == 448 * 448  # the tiny model's own max_pixels


def test_image_max_pixels_is_parsed_in_both_places() -> None:
    url = "data:image/png;base64,AA=="
    parts = [
        {"type": "image_url", "image_url": {"url": url, "max_pixels": "112*112"}},
        {"type": "image_url", "image_url": {"url": url}, "max_pixels": 5000},
    ]
    req = parse_request({"messages": [{"role": "user", "content": parts}], "pruning_ratio": 50})
    content = req.messages[0].content
    assert isinstance(content, list)
    assert [p.effective_max_pixels for p in content] == [112 * 112, 5000]  # type: ignore[union-attr]
    assert req.pruning_ratio == 50
    with pytest.raises(OpenAIError) as info:
        parse_request({"messages": [{"role": "user", "content": "hi"}], "pruning_ratio": 100})
    assert info.value.param == "pruning_ratio"


def test_the_visual_token_budget_says_what_to_lower() -> None:
    check_visual_tokens(64, Settings(max_visual_tokens=64))
    with pytest.raises(OpenAIError) as info:
        check_visual_tokens(65, Settings(max_visual_tokens=64))
    assert (info.value.status, info.value.code) == (400, "too_many_visual_tokens")
    assert "65 visual tokens" in info.value.message and "fps" in info.value.message


def test_pruning_where_it_cannot_apply(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    assert pruning_ratio(50, "qwen2_vl", "vlm_pipeline", settings) == 50
    for model_type, backend in (("llava", "vlm_pipeline"), ("qwen2_vl", "continuous_batching")):
        with pytest.raises(OpenAIError) as info:
            pruning_ratio(50, model_type, backend, settings)
        assert (info.value.status, info.value.param) == (400, "pruning_ratio")
        assert pruning_ratio(0, model_type, backend, settings) == 0
    server_wide = Settings(visual_token_pruning_ratio=30)
    assert pruning_ratio(None, "qwen2_vl", "vlm_pipeline", server_wide) == 30
    with caplog.at_level(logging.WARNING, logger="utils.media.budget"):
        assert pruning_ratio(None, "gemma3", "vlm_pipeline", server_wide) == 0
    assert "VLM_VISUAL_TOKEN_PRUNING_RATIO is ignored" in caplog.text


# --------------------------------------------------------------------- end to end

IMAGE = data_url(make_image("png", SIDE, SIDE), "image/png")


def ask(base_url: str, parts: list[dict[str, Any]], **fields: Any) -> httpx.Response:
    body = {
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What?"}]}],
        "max_completion_tokens": 2,
        "temperature": 0,
        **fields,
    }
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def prompt_tokens(base_url: str, parts: list[dict[str, Any]], **fields: Any) -> int:
    response = ask(base_url, parts, **fields)
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["prompt_tokens"])


def image_part(**options: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": IMAGE, **options}}


@pytest.fixture(scope="module", params=[f.kind for f in FAMILIES])
def budget_server(
    request: pytest.FixtureRequest,
    live_server: LiveServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, str]:
    kind = request.param
    served = served_model(kind, tmp_path_factory.getbasetemp() / "families")
    return kind, live_server(model_name=str(served.directory), **BUDGETS)


def test_detail_and_max_pixels_change_prompt_tokens(budget_server: tuple[str, str]) -> None:
    """usage.prompt_tokens = the text's tokens + the budget's visual tokens, for every
    detail and max_pixels, in the engine's own count."""
    kind, base_url = budget_server
    budgets = ImageBudgets.for_model(ModelConfig.read(tiny_model_ir(kind)), Settings(**BUDGETS))
    cases: list[tuple[dict[str, Any], int]] = [
        ({"detail": "low"}, budgets.low),
        ({"detail": "auto"}, budgets.auto),
        ({}, budgets.auto),
        ({"detail": "high"}, budgets.high),
        ({"max_pixels": 10**9}, CAP),  # never above the cap
        ({"max_pixels": 112 * 112}, 112 * 112),
        ({"detail": "high", "max_pixels": 112 * 112}, 112 * 112),
    ]
    low = prompt_tokens(base_url, [image_part(detail="low")])
    text = low - tokens_at(kind, budgets.low)
    for options, pixels in cases:
        expected = text + tokens_at(kind, pixels)
        assert prompt_tokens(base_url, [image_part(**options)]) == expected, options
    if kind in QWEN_KINDS:
        assert low == text + 16
        assert prompt_tokens(base_url, [image_part()]) == text + 36
    if kind in FIXED_KINDS:
        assert prompt_tokens(base_url, [image_part(detail="high")]) == low


def _frames(count: int) -> dict[str, Any]:
    frame = data_url(make_image("png", 64, 64), "image/png")
    return {"type": "video", "video": [frame] * count}


def test_the_total_visual_token_budget_holds(live_server: LiveServers) -> None:
    """Qwen2-VL: 64x64 frames are 4 tokens per 2 frames; a 448x448 image at low is 16."""
    base_url = live_server(max_visual_tokens=40, **BUDGETS)
    with_video = prompt_tokens(base_url, [_frames(8)])  # 16 visual tokens
    assert prompt_tokens(base_url, [_frames(8), image_part(detail="low")]) > with_video
    assert prompt_tokens(base_url, [_frames(20)]) > with_video  # 40: at the limit
    for parts in ([_frames(22)], [_frames(8), image_part(detail="auto")]):  # 44, 52
        response = ask(base_url, parts)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("too_many_visual_tokens", "messages")
        assert "max_visual_tokens=40" in error["message"]
    assert prompt_tokens(base_url, [_frames(8)]) == with_video  # the server still serves


@pytest.mark.parametrize("kind", QWEN_KINDS)
def test_pruning_reaches_the_engine(
    kind: str, live_server: LiveServers, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """VLMPipeline prunes the share of visual tokens asked for, and usage says so."""
    served = served_model(kind, tmp_path_factory.getbasetemp() / "families")
    base_url = live_server(model_name=str(served.directory), engine="vlm_pipeline", **BUDGETS)
    part = image_part(detail="high")
    visual = tokens_at(kind, CAP)
    whole = prompt_tokens(base_url, [part])
    assert prompt_tokens(base_url, [part], pruning_ratio=0) == whole
    for ratio in (50, 75):
        dropped = whole - prompt_tokens(base_url, [part], pruning_ratio=ratio)
        assert visual * ratio // 100 <= dropped <= -(-visual * ratio // 100), ratio


def test_pruning_is_refused_where_the_engine_ignores_it(
    live_server: LiveServers, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cb = live_server(**BUDGETS)  # Qwen2-VL in continuous batching
    llava = served_model("llava", tmp_path_factory.getbasetemp() / "families")
    vlm = live_server(model_name=str(llava.directory), engine="vlm_pipeline", **BUDGETS)
    for base_url in (cb, vlm):
        response = ask(base_url, [image_part()], pruning_ratio=50)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "pruning_ratio"
        assert prompt_tokens(base_url, [image_part()], pruning_ratio=0) > 0


def test_family_table_covers_the_pruning_families() -> None:
    assert {FAMILY[k].model_type for k in QWEN_KINDS} == set(budget.PRUNING_TYPES)
