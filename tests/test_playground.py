"""The playground at / of `slm serve`, in a real browser: Debian's Chromium, driven by Playwright.

The server is the real one (`slm serve` on a loopback port, SmolLM2 and Gemma 3 270M); the page talks to it
through the OpenAI API as any client does. A failed test leaves a screenshot in ``test-artifacts/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serving import SERVE_ARGS, InProcess, Server, assert_no_traceback
from slm.server import create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PRICE = {"input": 0.5, "output": 2.0}  # smollm2's, in the server's configuration file; gemma is not priced
TIMEOUT = 120_000  # ms: a shared two-core machine


def chromium() -> str:
    """Debian's Chromium (`make test` installs it), or the browser SLM_CHROMIUM names."""
    found = os.environ.get("SLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the playground's tests need Chromium: apt-get install chromium (Debian), or set SLM_CHROMIUM "
                    "to a Chromium or Chrome binary")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page (its own storage); screenshot saved if the test fails."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(TIMEOUT)
    yield page
    if getattr(request.node, "failed_call", False):
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / f"{request.node.name}.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
    context.close()
    assert not errors, f"the page's script failed: {errors}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("playground")
    config = workdir / "config.toml"
    config.write_text(f"[prices]\nsmollm2 = {{ input = {PRICE['input']}, output = {PRICE['output']} }}\n")
    with Server(workdir, "smollm2", str(gemma_path), *SERVE_ARGS, env={"SLM_CONFIG": str(config)}) as s:
        yield s
        assert_no_traceback(s)


def gemma_name(server: Server) -> str:
    names = [m["id"] for m in httpx.get(f"{server.url}/ui/models").json()["models"]]
    assert names[0] == "smollm2" and len(names) == 2
    return str(names[1])


def set_parameters(page: Any, **values: str) -> None:
    if not page.locator("#params").evaluate("d => d.open"):
        page.click("#params summary")
    for field, value in values.items():
        page.get_by_label(field, exact=True).fill(value)
        page.get_by_label(field, exact=True).dispatch_event("change")


def assistant_texts(page: Any) -> list[str]:
    return [str(t) for t in page.locator(".message.assistant .content").all_inner_texts()]


def wait_for_answer(page: Any, count: int) -> None:
    """Until ``count`` answers have ended (their figures are shown)."""
    page.wait_for_function(f"document.querySelectorAll('.message.assistant .figures:not(:empty)').length >= {count}"
                           " && !document.querySelector('[aria-busy=true]')", timeout=TIMEOUT)


def test_chat_answers_as_the_api_does_keeps_the_conversation_and_regenerates(page: Any, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-model option[value=smollm2]", state="attached")
    set_parameters(page, **{"Temperature": "0", "Max tokens": "24"})
    page.get_by_label("Model", exact=True).select_option("smollm2")
    page.get_by_label("Message", exact=True).fill("What is the capital of France?")
    page.get_by_label("Message", exact=True).press("Enter")
    wait_for_answer(page, 1)
    expected = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-").chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24).choices[0].message.content
    assert assistant_texts(page) == [expected]
    figures = page.locator(".message.assistant .figures").inner_text()
    assert re.search(r"first token \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens", figures), figures

    page.get_by_role("button", name="Regenerate").click()  # the answer again, in its place
    wait_for_answer(page, 1)
    assert assistant_texts(page) == [expected]

    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector("#chat-model option", state="attached")
    assert page.locator(".message").count() == 2 and assistant_texts(page) == [expected]
    page.get_by_role("button", name="New chat").click()
    assert page.locator(".message").count() == 0


def test_stop_ends_a_streaming_answer(page: Any, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    set_parameters(page, **{"Temperature": "0.8", "Max tokens": "1500"})
    page.get_by_label("Message", exact=True).fill("Write a very long story about a dragon who learns to cook.")
    page.get_by_role("button", name="Send").click()
    # streamed: text is on the page while the answer is still coming
    page.wait_for_function("document.querySelector('.message.assistant[aria-busy=true] .content')"
                           "?.textContent.length > 20", timeout=TIMEOUT)
    page.get_by_role("button", name="Stop").click()
    wait_for_answer(page, 1)
    assert "stopped" in page.locator(".message.assistant .figures").inner_text()
    text = assistant_texts(page)[0]
    time.sleep(1)
    assert assistant_texts(page)[0] == text and text
    assert page.get_by_role("button", name="Send").is_enabled()
    assert not page.get_by_role("button", name="Stop").is_enabled()
    deadline = time.monotonic() + 30  # the server stopped generating: the browser closed the stream
    while server.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.stats()["running"] == 0


def test_bad_input_is_named_on_the_page(page: Any, server: Server, tmp_path: Path) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    set_parameters(page, **{"JSON schema (the answer is JSON that fits it)": "{not json"})
    page.get_by_label("Message", exact=True).fill("Hello")
    page.get_by_label("Message", exact=True).press("Enter")
    assert page.get_by_role("alert").inner_text().startswith("JSON schema: not valid JSON")
    assert page.locator(".message").count() == 0  # nothing was sent, the message is still in the box
    assert page.get_by_label("Message", exact=True).input_value() == "Hello"

    set_parameters(page, **{"JSON schema (the answer is JSON that fits it)": ""})
    image = tmp_path / "dot.png"
    image.write_bytes(bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"))
    page.locator("#image").set_input_files(str(image))
    page.get_by_role("button", name="Send").click()  # SmolLM2 sees no images: the server's 400 is shown
    # (the schema's error may still be on the page until the answer starts: wait for the server's)
    page.wait_for_function("document.getElementById('error').textContent.includes('image')", timeout=TIMEOUT)
    assert not page.get_by_role("alert").inner_text().startswith("JSON schema")
    assert page.get_by_role("button", name="Send").is_enabled()


def test_json_schema_shapes_the_answer(page: Any, server: Server) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    set_parameters(page, **{"Temperature": "0", "Max tokens": "40",
                            "JSON schema (the answer is JSON that fits it)": json.dumps(schema)})
    page.get_by_label("Message", exact=True).fill("Which city is the capital of France?")
    page.get_by_label("Message", exact=True).press("Enter")
    wait_for_answer(page, 1)
    assert isinstance(json.loads(assistant_texts(page)[0])["city"], str)


def test_compare_streams_two_models_side_by_side_with_their_figures(page: Any, server: Server) -> None:
    gemma = gemma_name(server)
    page.goto(server.url + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    set_parameters(page, **{"Temperature": "0", "Max tokens": "24"})
    page.get_by_role("tab", name="Compare").click()
    page.get_by_label("Prompt", exact=True).fill("Name three colours.")
    page.get_by_label("First", exact=True).select_option("smollm2")
    page.get_by_label("Second", exact=True).select_option(gemma)
    page.get_by_role("button", name="Compare").click()
    page.wait_for_selector("#chart:not([hidden])", timeout=TIMEOUT)

    columns = page.locator(".column")
    assert columns.locator("h2").all_inner_texts() == ["smollm2", gemma]
    for i in range(2):
        column = columns.nth(i)
        assert column.locator(".content").inner_text().strip()
        assert float(column.locator("[data-figure='tokens/s']").inner_text()) > 0
        assert re.fullmatch(r"\d+\.\d\d s", column.locator("[data-figure='first token']").inner_text())
    tokens = re.fullmatch(r"(\d+) in, (\d+) out", columns.nth(0).locator("[data-figure=tokens]").inner_text())
    assert tokens, "smollm2's token counts"
    prompt, completion = int(tokens[1]), int(tokens[2])
    assert 0 < completion <= 24
    expected = (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6
    shown = columns.nth(0).locator("[data-figure=cost]").inner_text()
    assert float(shown.removeprefix("$")) == pytest.approx(expected, rel=0.01)
    assert columns.nth(1).locator("[data-figure=cost]").inner_text() == "$0"  # not priced
    bars = page.locator("#chart rect")
    assert bars.count() == 4  # tokens/s and first token, a bar a model
    assert {bars.nth(i).get_attribute("data-model") for i in range(4)} == {"smollm2", gemma}


def test_a_server_with_an_api_key_asks_for_it(page: Any) -> None:
    with InProcess(create_app(["smollm2"], api_key="sesame", preload=False)) as server:
        page.goto(server.url + "/")  # the page itself is open...
        key = page.get_by_label("This server needs an API key", exact=True)
        key.wait_for()
        assert page.locator("#chat-model option").count() == 0  # ...the models are not
        key.fill("wrong")
        page.get_by_role("button", name="Use this key").click()
        page.get_by_label("That key was refused: type the server's API key", exact=True).wait_for()
        page.get_by_label("That key was refused: type the server's API key", exact=True).fill("sesame")
        page.get_by_role("button", name="Use this key").click()
        page.wait_for_selector("#chat-model option[value=smollm2]", state="attached")
        assert page.locator("#key-form").is_hidden()
        page.reload()  # the key is remembered
        page.wait_for_selector("#chat-model option[value=smollm2]", state="attached")
        assert page.locator("#key-form").is_hidden()


def test_the_page_its_files_and_no_ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    html = {"Accept": "text/html,application/xhtml+xml"}
    with InProcess(create_app(["smollm2"], api_key="sesame", preload=False)) as server:
        page = httpx.get(server.url + "/", headers=html)
        assert page.status_code == 200 and "<title>slm playground</title>" in page.text
        assert httpx.get(server.url + "/").text == "slm is running"  # what Ollama's clients probe for
        for name in ("app.js", "style.css"):
            assert httpx.get(f"{server.url}/ui/static/{name}").status_code == 200  # open: nothing secret
        assert httpx.get(server.url + "/ui/models").status_code == 401
        models = httpx.get(server.url + "/ui/models", headers={"Authorization": "Bearer sesame"}).json()
        assert models == {"models": [{"id": "smollm2", "kind": "local", "price": {"input": 0.0, "output": 0.0}}]}
        monkeypatch.setenv("SLM_CONFIG", str(tmp_path / "config.toml"))
        (tmp_path / "config.toml").write_text("[prices]\nsmollm2 = { input = -1 }\n")
        wrong = httpx.get(server.url + "/ui/models", headers={"Authorization": "Bearer sesame"})
        assert wrong.status_code == 500 and "prices.smollm2.input" in wrong.json()["error"]["message"]
    with InProcess(create_app(["smollm2"], preload=False, ui=False)) as server:
        assert httpx.get(server.url + "/", headers=html).text == "slm is running"
        assert httpx.get(server.url + "/ui/static/app.js").status_code == 404
        assert httpx.get(server.url + "/ui/models").status_code == 404


def test_serve_no_ui(tmp_path: Path) -> None:
    with Server(tmp_path, "smollm2", *SERVE_ARGS, "--no-ui") as server:
        assert httpx.get(server.url + "/", headers={"Accept": "text/html"}).text == "slm is running"
        assert "playground" not in server.log()
