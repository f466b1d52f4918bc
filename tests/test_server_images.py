"""Images through the server, with the official clients: OpenAI ``image_url`` data URIs and Ollama ``images``,
beside text requests in the same batch; the prefix cache keeps an image's work; bad images get a 400 naming
the part, and the server goes on."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anthropic
import httpx
import numpy as np
import ollama
import openai
import pytest
from PIL import Image

from serving import InProcess
from slm.engines import media
from slm.server import create_app, image_urls
from vision_models import converted_tiny_gemma3_vlm, tiny_gemma3_vlm

TEXT = "smollm2"


def picture_png(seed: int, size: int = 224) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size * size * 3, dtype=np.uint8)
    out = io.BytesIO()
    Image.frombytes("RGB", (size, size), pixels.tobytes()).save(out, format="PNG")
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_turn(png: bytes, text: str = "Describe this:") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_uri(png)}}]}]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[InProcess, str]]:
    text_gguf, _ = converted_tiny_gemma3_vlm()
    with InProcess(create_app([str(text_gguf), TEXT], parallel=4, n_ctx=512, threads=1)) as server:
        vlm = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        yield server, vlm


def openai_client(server: InProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def stats(server: InProcess, name: str) -> dict:
    return httpx.get(f"{server.url}/health").json()["models"][name]


def test_an_image_request_and_text_requests_at_once_are_all_answered(served: tuple[InProcess, str]) -> None:
    server, vlm = served
    client = openai_client(server)

    def ask_image(seed: int) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=vlm, messages=image_turn(picture_png(seed)), max_tokens=12,
                                              temperature=0)

    def ask_text(words: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=vlm, messages=[{"role": "user", "content": words}],
                                              max_tokens=12, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask_image, 10), pool.submit(ask_text, "Hello there"),
                   pool.submit(ask_image, 11), pool.submit(ask_text, "Count to five")]
        answers = [f.result() for f in futures]
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert all(a.usage.completion_tokens > 0 for a in answers)
    # The image's 16 positions (and its markers) are in the prompt's usage.
    assert answers[0].usage.prompt_tokens > answers[1].usage.prompt_tokens + 16
    # The same image alone, greedy: the same answer as in the batch.
    assert ask_image(10).choices[0].message.content == answers[0].choices[0].message.content


def test_a_vision_folder_on_transformers_answers_images_beside_text_as_the_python_api_does() -> None:
    import slm

    folder = str(tiny_gemma3_vlm())
    with slm.load(folder, engine="transformers", n_ctx=512) as alone:
        expected = alone.chat(image_turn(picture_png(12)), temperature=0, max_tokens=8).text
    with InProcess(create_app([folder], parallel=2, n_ctx=512, threads=1)) as server:
        name = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        client = openai_client(server)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            image = pool.submit(client.chat.completions.create, model=name, messages=image_turn(picture_png(12)),
                                max_tokens=8, temperature=0)
            text = pool.submit(client.chat.completions.create, model=name, max_tokens=8, temperature=0,
                               messages=[{"role": "user", "content": "Count to five"}])
            answers = [image.result(), text.result()]
    assert answers[0].choices[0].message.content == expected
    assert answers[1].usage.completion_tokens > 0
    assert answers[0].usage.prompt_tokens > answers[1].usage.prompt_tokens + 16  # the image's positions


def test_a_repeated_image_is_read_from_the_prefix_cache(served: tuple[InProcess, str]) -> None:
    server, vlm = served
    client = openai_client(server)
    png = picture_png(20)
    first = client.chat.completions.create(model=vlm, messages=image_turn(png), max_tokens=4, temperature=0)
    before = stats(server, vlm)
    again = client.chat.completions.create(model=vlm, messages=image_turn(png, "Describe this:"), max_tokens=4,
                                           temperature=0)
    after = stats(server, vlm)
    assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
    # Everything up to the last prompt token came from the cache: the image was not decoded again.
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_the_ollama_client_sends_images_on_chat_and_generate(served: tuple[InProcess, str]) -> None:
    server, vlm = served
    client = ollama.Client(host=server.url, timeout=120)
    png = picture_png(30)
    chat = client.chat(model=vlm, messages=[{"role": "user", "content": "Describe this:", "images": [png]}],
                       options={"temperature": 0, "num_predict": 6})
    assert chat.message.content and chat.done
    generated = client.generate(model=vlm, prompt="Describe this:", images=[png],
                                options={"temperature": 0, "num_predict": 6})
    assert generated.response == chat.message.content  # the same turn: images before the text
    assert "vision" in client.show(vlm).capabilities and "vision" not in client.show(TEXT).capabilities


def test_an_anthropic_image_block_is_the_openai_image_part(served: tuple[InProcess, str]) -> None:
    """A base64 ``image`` block of /v1/messages takes the OpenAI route's image path: the same prompt, the same
    greedy answer; a bad one is named by its place in the Anthropic request."""
    server, vlm = served
    png = picture_png(13)
    chat = openai_client(server).chat.completions.create(model=vlm, messages=image_turn(png), max_tokens=8,
                                                         temperature=0)
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(png).decode()}}
    turn = [{"role": "user", "content": [{"type": "text", "text": "Describe this:"}, image]}]
    message = client.messages.create(model=vlm, messages=turn, max_tokens=8,  # type: ignore[arg-type]
                                     extra_body={"temperature": 0})
    assert message.content[0].text == chat.choices[0].message.content  # type: ignore[union-attr]
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) == chat.usage.prompt_tokens  # type: ignore[union-attr]
    broken = {**image, "source": {**image["source"], "data": base64.b64encode(b"not an image").decode()}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=vlm, max_tokens=8, messages=[  # type: ignore[arg-type]
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": [broken, {"type": "text", "text": "What is it?"}]}])
    assert "messages[2].content[0]" in str(caught.value)


def test_the_model_list_says_which_models_take_images(served: tuple[InProcess, str]) -> None:
    server, vlm = served
    cards = {card.id: card for card in openai_client(server).models.list()}
    assert cards[vlm].model_extra == {"capabilities": ["completion", "vision"]}
    assert cards[TEXT].model_extra == {"capabilities": ["completion"]}
    assert openai_client(server).models.retrieve(vlm).model_extra == {"capabilities": ["completion", "vision"]}


@pytest.mark.parametrize(("content", "field", "says"), [
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}}],
     "messages[0].content[0]", "is not an image"),
    ([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": data_uri(picture_png(1)[:300])}}],
     "messages[0].content[1]", "truncated or corrupt"),
    ([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
     "messages[0].content[0]", "URLs are not fetched"),
    ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
     "messages[0].content[0]", "not valid base64"),
])
def test_a_bad_image_gets_a_400_naming_its_part_and_the_server_goes_on(
        served: tuple[InProcess, str], content: list, field: str, says: str) -> None:
    server, vlm = served
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=vlm, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert caught.value.body["param"] == field and says in caught.value.message
    assert client.chat.completions.create(model=vlm, messages=image_turn(picture_png(0)), max_tokens=2).choices


def test_images_to_a_text_only_model_and_with_raw_are_refused(served: tuple[InProcess, str]) -> None:
    server, vlm = served
    with pytest.raises(openai.BadRequestError, match="does not take images") as caught:
        openai_client(server).chat.completions.create(model=TEXT, messages=image_turn(picture_png(0)), max_tokens=2)
    assert caught.value.body["param"] == "messages[0].content[1]"
    png = base64.b64encode(picture_png(0)).decode()
    refused = httpx.post(f"{server.url}/api/generate", json={"model": TEXT, "prompt": "x", "images": [png],
                                                             "stream": False})
    assert refused.status_code == 400 and "images[0]" in refused.json()["error"]
    raw = httpx.post(f"{server.url}/api/generate", json={"model": vlm, "prompt": "x", "images": [png], "raw": True,
                                                         "stream": False})
    assert raw.status_code == 400 and "raw" in raw.json()["error"]
    broken = httpx.post(f"{server.url}/api/chat", json={"model": vlm, "stream": False, "messages": [
        {"role": "user", "content": "x", "images": ["bm90IGFuIGltYWdl"]}]})
    assert broken.status_code == 400 and "messages[0].images[0]" in broken.json()["error"]


class _Images(BaseHTTPRequestHandler):
    """The suite's own image host: a picture, redirects on and off the host, a missing one, a slow one."""

    png = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        port = self.server.server_address[1]
        if self.path == "/cat.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        elif self.path in ("/same-host", "/other-host"):
            self.send_response(302)
            host = "127.0.0.1" if self.path == "/same-host" else "localhost"
            self.send_header("Location", f"http://{host}:{port}/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    _Images.png = picture_png(40)
    host = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()


def url_turn(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this:"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_image_urls_are_fetched_only_when_allowed_and_within_limits(
        served: tuple[InProcess, str], image_host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    server, vlm = served
    with pytest.raises(openai.BadRequestError, match="URLs are not fetched"):  # off by default
        openai_client(server).chat.completions.create(model=vlm, messages=url_turn(f"{image_host}/cat.png"),
                                                      max_tokens=2)
    text_gguf, _ = converted_tiny_gemma3_vlm()
    monkeypatch.setattr(image_urls, "TIMEOUT", 0.5)
    with InProcess(create_app([str(text_gguf)], allow_image_urls=True, n_ctx=512, threads=1)) as fetching:
        client = openai_client(fetching)
        by_url = client.chat.completions.create(model=vlm, messages=url_turn(f"{image_host}/cat.png"), max_tokens=6,
                                                temperature=0)
        inline = client.chat.completions.create(model=vlm, messages=image_turn(picture_png(40)), max_tokens=6,
                                                temperature=0)
        assert by_url.choices[0].message.content == inline.choices[0].message.content
        assert client.chat.completions.create(model=vlm, messages=url_turn(f"{image_host}/same-host"),
                                              max_tokens=2).choices
        for path, says in [("/other-host", "redirects to another host"), ("/missing", "HTTP 404"),
                           ("/slow", "took more than 0.5 s")]:
            with pytest.raises(openai.BadRequestError, match=says) as caught:
                client.chat.completions.create(model=vlm, messages=url_turn(f"{image_host}{path}"), max_tokens=2)
            assert caught.value.body["param"] == "messages[0].content[1]"
        monkeypatch.setattr(media, "MAX_BYTES", 1000)
        with pytest.raises(openai.BadRequestError, match="beyond the limit of 1000"):
            client.chat.completions.create(model=vlm, messages=url_turn(f"{image_host}/cat.png"), max_tokens=2)
