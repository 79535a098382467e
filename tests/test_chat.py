"""The official `openai` client against the real server on the tiny Qwen2-VL model,
with media from a local web server and as data URLs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.fixtures.server import (
    IMAGE_FORMATS,
    LiveServers,
    MediaServer,
    data_url,
    make_image,
    make_video,
)

MODEL = "embedded/tiny-qwen2-vl"
# Fixed-length, deterministic generations for the checks below.
GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def base_url(live_server: LiveServers) -> str:
    return live_server(media_allow_private_networks=True)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def ask(client: openai.OpenAI, *parts: Any, **kwargs: Any) -> Any:
    options: dict[str, Any] = {"max_completion_tokens": 4, **kwargs}
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": list(parts)}], **options
    )


def prompt_tokens(client: openai.OpenAI, *parts: Any) -> int:
    usage = ask(client, *parts, max_completion_tokens=1).usage
    assert usage is not None
    return usage.prompt_tokens


def test_image_by_url(client: openai.OpenAI, media_server: MediaServer) -> None:
    response = ask(
        client, image_part(media_server.url("image.png")), text_part("What is this?"), **GREEDY
    )
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.system_fingerprint and response.created > 0
    (choice,) = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    usage = response.usage
    assert usage is not None
    assert usage.completion_tokens == 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the image's visual tokens are part of the prompt
    assert usage.prompt_tokens > prompt_tokens(client, text_part("What is this?"))


@pytest.mark.parametrize("fmt", sorted(IMAGE_FORMATS))
def test_every_image_format(client: openai.OpenAI, media_server: MediaServer, fmt: str) -> None:
    by_url = ask(client, image_part(media_server.url(f"image.{fmt}")), text_part("?"))
    mime = IMAGE_FORMATS[fmt][1]
    by_data = ask(client, image_part(data_url(make_image(fmt), mime)), text_part("?"))
    assert by_url.usage is not None and by_data.usage is not None
    assert by_url.usage.prompt_tokens == by_data.usage.prompt_tokens
    assert by_url.usage.prompt_tokens > prompt_tokens(client, text_part("?"))


def test_several_images_and_images_across_turns(
    client: openai.OpenAI, media_server: MediaServer
) -> None:
    one = prompt_tokens(client, image_part(media_server.url("image.png")), text_part("a"))
    two = prompt_tokens(
        client,
        image_part(media_server.url("image.png")),
        image_part(media_server.url("image.jpeg")),
        text_part("a"),
    )
    assert two > one
    response = client.chat.completions.create(
        model=MODEL,
        max_completion_tokens=3,
        messages=[
            {"role": "system", "content": "You describe images."},
            {
                "role": "user",
                "content": [image_part(media_server.url("image.png")), text_part("a")],
            },
            {"role": "assistant", "content": "A gradient."},
            {
                "role": "user",
                "content": [text_part("and"), image_part(media_server.url("image.webp"))],
            },
        ],
    )
    assert response.usage is not None
    # the whole history, with both images, reached the model
    assert response.usage.prompt_tokens > two


def test_video_url_from_the_web_and_as_data(
    client: openai.OpenAI, media_server: MediaServer
) -> None:
    text_only = prompt_tokens(client, text_part("Describe."))
    for url in (
        media_server.url("video.mp4"),
        media_server.url("video-mpeg4.mp4"),
        data_url(make_video(), "video/mp4"),
    ):
        tokens = prompt_tokens(
            client, {"type": "video_url", "video_url": {"url": url}}, text_part("Describe.")
        )
        assert tokens > text_only
    # Qwen style: a `video` part holding one video URL
    qwen_style = {"type": "video", "video": media_server.url("video.mp4")}
    as_video_url = {"type": "video_url", "video_url": {"url": media_server.url("video.mp4")}}
    assert prompt_tokens(client, qwen_style, text_part("Describe.")) == prompt_tokens(
        client, as_video_url, text_part("Describe.")
    )


def test_video_fps_and_max_pixels_change_the_visual_tokens(
    client: openai.OpenAI, media_server: MediaServer
) -> None:
    def tokens(name: str, **options: Any) -> int:
        part = {"type": "video_url", "video_url": {"url": media_server.url(name), **options}}
        return prompt_tokens(client, part, text_part("?"))

    # 2 s of video: 1 fps gives 2 frames, 4 fps gives 8
    assert tokens("video.mp4", fps=4) > tokens("video.mp4", fps=1)
    # 224x168 frames, or frames that fit 112x84 pixels
    assert tokens("video-large.mp4", max_pixels="112*84") < tokens("video-large.mp4")


def test_frame_list_video(client: openai.OpenAI, media_server: MediaServer) -> None:
    frames = [media_server.url(f"frame{k}.png") for k in range(4)]
    frames.append(data_url(make_image("jpeg", 96, 80, seed=5), "image/jpeg"))  # other size
    response = ask(client, {"type": "video", "video": frames}, text_part("What happens?"))
    assert response.usage is not None
    assert response.usage.prompt_tokens > prompt_tokens(client, text_part("What happens?"))


def test_streaming_gives_the_same_text(client: openai.OpenAI, media_server: MediaServer) -> None:
    parts = (image_part(media_server.url("image.png")), text_part("Tell me."))
    whole = ask(client, *parts, **{**GREEDY, "max_completion_tokens": 12})
    stream = ask(
        client,
        *parts,
        **GREEDY,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 1  # token by token, not all at the end
    assert "".join(deltas) == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert whole.usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


async def test_async_client(base_url: str, media_server: MediaServer) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        messages: Any = [
            {
                "role": "user",
                "content": [image_part(media_server.url("image.gif")), text_part("Hi")],
            }
        ]
        response = await client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=6, **GREEDY
        )
        assert response.choices[0].finish_reason == "length"
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=6, stream=True, **GREEDY
        )
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert text == response.choices[0].message.content
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]


def test_max_completion_tokens_and_max_tokens(client: openai.OpenAI) -> None:
    for field in ("max_completion_tokens", "max_tokens"):
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count."}],
            **{field: 5},
            **GREEDY,
        )
        assert response.usage is not None
        assert response.usage.completion_tokens == 5
        assert response.choices[0].finish_reason == "length"


def test_min_tokens(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=7,
        extra_body={"min_tokens": 7},
    )
    assert response.usage is not None and response.usage.completion_tokens == 7


def test_same_seed_same_text_when_sampling(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write something."}],
            max_completion_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return response.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    # other seeds give other samples (16 random tokens each)
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_cuts_the_text(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say something long."}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=16, stream=True, **GREEDY
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    full = "".join(deltas)
    candidates = [d for d in deltas[3:] if d.strip() and "\ufffd" not in d]
    assert candidates, f"no usable stop word in {deltas!r}"
    stop = candidates[0]
    expected = full[: full.index(stop)]
    for stop_field in (stop, [stop, "never-produced-sequence"]):
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=16, stop=stop_field, **GREEDY
        )
        choice = response.choices[0]
        assert choice.message.content == expected
        assert choice.finish_reason == "stop"


def test_n_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_completion_tokens=4,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in response.choices)
    assert response.usage is not None and response.usage.completion_tokens == 8

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_completion_tokens=4,
        temperature=1.0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a name as JSON."}],
        max_completion_tokens=12,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    text = response.choices[0].message.content or ""
    # random weights: the output is only guaranteed to be a valid prefix
    assert re.fullmatch(r'\s*\{\s*("(n(a(m(e("\s*(:.*)?)?)?)?)?)?)?', text, re.S), text

    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please."}],
        max_completion_tokens=6,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert (response.choices[0].message.content or "").lstrip().startswith("{")


def test_models_routes(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
