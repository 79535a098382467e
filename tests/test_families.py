"""Every model family of tests/families.py, end to end, in both pipelines.

Each family's tiny model is built and exported once (cached like `qwen2vl_ir`) and
served from a copy whose config.json says a 4096-token context, so that the context
check can be run at its exact boundary. Per family and pipeline one engine serves:
one image, several images, images across turns, video (native, or frames as images),
the family's refusals (400 before the engine runs) and the context check; the
prompt-token count the server predicts must equal the one the engine reports. Per
family one live server answers the same request streamed and not.

`-m "not families"` skips the matrix; `--family qwen3-vl` (repeatable) runs one family.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.families import BACKENDS, FAMILIES, FAMILY, Family
from tests.fixtures.models import tiny_model_ir
from tests.fixtures.server import LiveServers, data_url, make_image, make_image_array
from utils.engine.client import EngineClient
from utils.engine.model_config import ModelConfig
from utils.engine.prompt import Preparer, RequestError
from utils.engine.tags import image_tag, video_tag
from utils.engine.types import GenerationRequest, SamplingParams
from utils.errors import OpenAIError
from utils.models.manifest import MANIFEST_NAME
from utils.settings import Settings

pytestmark = pytest.mark.families
ON_LOOP = pytest.mark.asyncio(loop_scope="session")

CONTEXT = 4096  # what the served copy's config.json says
MAX_NEW = 4
# (height, width): 70 and 80 px sides are where C++ rounding differs from Python's
IMAGE_SHAPES = [(48, 64), (70, 70), (80, 80), (90, 200)]


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return make_image_array(width, height, seed)


def video(frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.stack([image(height, width, seed) for seed in range(frames)])


@dataclasses.dataclass
class Served:
    family: Family
    directory: Path
    preparer: Preparer  # the server's own preparation, in this process, for predictions


_SERVED: dict[str, Served] = {}


def served_model(kind: str, root: Path) -> Served:
    """The family's exported model, linked into `root/kind` with a 4096-token context."""
    if kind in _SERVED:
        return _SERVED[kind]
    import openvino
    import openvino_genai

    source = tiny_model_ir(kind)
    target = root / kind
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name not in ("config.json", MANIFEST_NAME) and not (target / path.name).exists():
            (target / path.name).symlink_to(path)
    config = json.loads((source / "config.json").read_text())
    config.setdefault("text_config", {})["max_position_embeddings"] = CONTEXT
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = openvino_genai.Tokenizer(str(target))
    preparer = Preparer(openvino, openvino_genai, tokenizer, target, ModelConfig.read(target))
    preparer.max_context = 1 << 30  # it predicts counts; the engine checks the context
    _SERVED[kind] = Served(FAMILY[kind], target, preparer)
    return _SERVED[kind]


@dataclasses.dataclass
class Engine:
    served: Served
    client: EngineClient

    @property
    def family(self) -> Family:
        return self.served.family

    def predicted(self, request: GenerationRequest) -> int:
        preparer = self.served.preparer
        return preparer.prompt_tokens(preparer.prepare(request))

    async def run(self, request: GenerationRequest) -> tuple[str, int, int, str | None]:
        """(text, completion tokens, prompt tokens, finish reason) of choice 0."""
        text, tokens, prompt, finish = "", 0, 0, None
        async for event in self.client.generate(request):
            text += event.text
            tokens, prompt = event.completion_tokens, event.prompt_tokens
            finish = event.finish_reason or finish
        return text, tokens, prompt, finish

    async def check(self, request: GenerationRequest) -> int:
        """Runs `request`; the engine's prompt count must be the server's prediction."""
        predicted = self.predicted(request)
        _, tokens, prompt, finish = await self.run(request)
        assert (tokens, finish) == (request.params.max_new_tokens, "length")
        assert prompt == predicted, f"engine counted {prompt}, the server predicted {predicted}"
        return prompt


def make_request(
    messages: list[dict[str, str]],
    images: list[np.ndarray] | None = None,
    videos: list[np.ndarray] | None = None,
    max_new_tokens: int = MAX_NEW,
) -> GenerationRequest:
    videos = videos or []
    return GenerationRequest(
        request_id="family",
        messages=messages,
        params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True),
        images=images or [],
        videos=videos,
        video_fps=[2.0] * len(videos),
    )


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(
    scope="module",
    params=[(f.kind, b) for f in FAMILIES for b in BACKENDS],
    ids=[
        f"{f.kind}-{'cb' if b == 'continuous_batching' else 'vlm'}"
        for f in FAMILIES
        for b in BACKENDS
    ],
)
async def family_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    kind, backend = request.param
    served = served_model(kind, tmp_path_factory.getbasetemp() / "families")
    settings = Settings(
        model_name=served.family.embedded,
        engine=backend,
        max_queue=8,
        max_num_seqs=4,
        kv_cache_size_gb=1,
    )
    client = EngineClient(settings, served.directory)
    await client.start()
    assert client.backend == backend
    yield Engine(served, client)
    await client.stop()


# --------------------------------------------------------------------------- engine


@ON_LOOP
async def test_one_image(family_engine: Engine) -> None:
    request = make_request(user(image_tag(0) + "Describe the picture."), [image(48, 64)])
    prompt = await family_engine.check(request)
    assert prompt > 10
    # one BOS at most: a template that writes it (Gemma 3) loses its own
    preparer = family_engine.served.preparer
    ids = preparer.tokenizer.encode(preparer.prepare(request).prompt).input_ids
    bos = int(preparer.tokenizer.get_bos_token_id())
    assert ids.data.ravel().tolist()[:2] != [bos, bos]


@ON_LOOP
async def test_several_images(family_engine: Engine) -> None:
    images = [image(h, w, seed) for seed, (h, w) in enumerate(IMAGE_SHAPES)]
    tags = "".join(image_tag(i) for i in range(len(images)))
    await family_engine.check(make_request(user(tags + "Compare these."), images))


@ON_LOOP
async def test_images_across_turns(family_engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": image_tag(0) + "What is this?"},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": image_tag(1) + "And this one?"},
    ]
    await family_engine.check(make_request(messages, [image(48, 64), image(90, 200, 1)]))


@ON_LOOP
async def test_video(family_engine: Engine) -> None:
    """Native video where the pipeline has it (an odd frame count pads the last
    group); otherwise the frames go in as images, as the HTTP layer sends them."""
    clip = video(5)
    if family_engine.family.native_video:
        request = make_request(user(video_tag(0) + "What happens?"), videos=[clip])
    else:
        tags = "".join(image_tag(i) for i in range(len(clip)))
        request = make_request(user(tags + "What happens?"), images=list(clip))
    await family_engine.check(request)


@ON_LOOP
async def test_refusals_are_400_before_the_engine_runs(family_engine: Engine) -> None:
    family = family_engine.family
    for refusal in family.refusals:
        if refusal.image is not None:
            request = make_request(user(image_tag(0) + "What is it?"), [image(*refusal.image)])
        else:
            clip = video(refusal.video_frames)
            request = make_request(user(video_tag(0) + "What is it?"), videos=[clip])
        with pytest.raises(RequestError):  # in the server's preparation, not the engine
            family_engine.served.preparer.prepare(request)
        with pytest.raises(OpenAIError) as info:
            await family_engine.run(request)
        assert (info.value.status, info.value.code) == (400, "invalid_media"), refusal.what
    if not family.native_video:
        request = make_request(user(video_tag(0) + "What is it?"), videos=[video(4)])
        with pytest.raises(OpenAIError) as info:
            await family_engine.run(request)
        assert info.value.status == 400
    # the engine still serves
    await family_engine.check(make_request(user(image_tag(0) + "Hi"), [image(48, 64)]))


def _padded(family_engine: Engine, target: int) -> GenerationRequest:
    """A one-image request whose predicted prompt is exactly `target` tokens."""
    words = target // 2
    for _ in range(8):
        request = make_request(
            user(image_tag(0) + "Describe" + " dog" * words + "."),
            [image(48, 64)],
            max_new_tokens=16,
        )
        count = family_engine.predicted(request)
        if count == target:
            return request
        words += target - count
    raise AssertionError(f"no prompt of exactly {target} tokens")


@ON_LOOP
async def test_context_check_at_its_boundary(family_engine: Engine) -> None:
    """A prompt of the whole context is refused before the engine runs; one token
    less is served (with one new token), and the engine counts it the same."""
    with pytest.raises(OpenAIError) as info:
        await family_engine.run(_padded(family_engine, CONTEXT))
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")
    request = _padded(family_engine, CONTEXT - 1)
    _, tokens, prompt, finish = await family_engine.run(request)
    assert (tokens, prompt, finish) == (1, CONTEXT - 1, "length")


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="session", params=[f.kind for f in FAMILIES])
def family_ir(request: pytest.FixtureRequest) -> tuple[Family, Path]:
    """A family and its exported tiny model, built once per builder content."""
    return FAMILY[request.param], tiny_model_ir(request.param)


def test_model_config_of_the_export(family_ir: tuple[Family, Path]) -> None:
    """The context key, model type and video support read from the real export."""
    family, path = family_ir
    model = ModelConfig.read(path)
    assert model.model_type == family.model_type
    assert model.max_context == family.context
    assert model.supports_video == family.native_video


# --------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module", params=[f.kind for f in FAMILIES])
def family_server(
    request: pytest.FixtureRequest,
    live_server: LiveServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Family, openai.OpenAI]]:
    served = served_model(request.param, tmp_path_factory.getbasetemp() / "families")
    base_url = live_server(model_name=str(served.directory), served_model_name="tiny")
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield served.family, client


def _image_part(height: int, width: int, seed: int = 0) -> dict[str, Any]:
    url = data_url(make_image("png", width, height, seed), "image/png")
    return {"type": "image_url", "image_url": {"url": url}}


def _ask(client: openai.OpenAI, content: list[dict[str, Any]], **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],  # type: ignore[misc,list-item]
        max_completion_tokens=MAX_NEW,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


def test_http_streamed_and_not(family_server: tuple[Family, openai.OpenAI]) -> None:
    """An image and a video (frames), answered whole and streamed: same text, same usage."""
    _, client = family_server
    frames = [_image_part(64, 64, seed)["image_url"]["url"] for seed in range(4)]
    content = [
        _image_part(48, 64),
        {"type": "video", "video": frames},
        {"type": "text", "text": "What happens?"},
    ]
    whole = _ask(client, content)
    assert whole.usage.completion_tokens == MAX_NEW
    chunks = list(_ask(client, content, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 10


def test_http_refusals_are_400(family_server: tuple[Family, openai.OpenAI]) -> None:
    family, client = family_server
    for refusal in family.refusals:
        if refusal.image is not None:
            part = _image_part(*refusal.image)
        else:
            frames = [_image_part(64, 64)["image_url"]["url"]] * refusal.video_frames
            part = {"type": "video", "video": frames}
        with pytest.raises(openai.BadRequestError) as info:
            _ask(client, [part, {"type": "text", "text": "What is it?"}])
        assert info.value.status_code == 400, refusal.what
