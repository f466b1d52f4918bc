"""Takes the README's screenshot of the playground's compare view: `slm serve` with three local models,
one prompt sent to all three in headless Chromium (Debian's), the page saved as docs/playground-compare.png.

    .venv/bin/python docs/playground_screenshot.py

The prices are example figures written into a configuration file of its own (as a user would set them in
``[prices]``); the timings are this machine's at the time of the shot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

MODELS = ["smollm2", "qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"]
PRICES = """[prices]
"qwen2.5-coder:0.5b" = { input = 0.02, output = 0.04 }
"qwen2.5-coder:1.5b" = { input = 0.05, output = 0.10 }
"""
PROMPT = "In two sentences: why would an app run a small language model on the device?"
PORT = 8189
OUT = Path(__file__).resolve().parent / "playground-compare.png"


def main() -> None:
    workdir = Path(tempfile.mkdtemp())
    (workdir / "config.toml").write_text(PRICES)
    env = {**os.environ, "SLM_CONFIG": str(workdir / "config.toml")}
    slm = Path(sys.executable).parent / "slm"
    server = subprocess.Popen([str(slm), "serve", *MODELS, "--port", str(PORT), "--threads", "2"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{PORT}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
            page.goto(url + "/")
            page.wait_for_selector("#chat-model option", state="attached")
            page.click("#params summary")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "80")
            page.click("#params summary")
            page.click("#tab-compare")
            page.fill("#compare-prompt", PROMPT)
            for i, model in enumerate(MODELS, 1):
                page.select_option(f"#compare-model-{i}", model)
            page.click("#compare-run")
            page.wait_for_selector("#chart:not([hidden])", timeout=300_000)
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(workdir, ignore_errors=True)
    print(OUT)


if __name__ == "__main__":
    main()
