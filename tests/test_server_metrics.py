"""GET /metrics: Prometheus text with the scheduler's counters, latency histograms and HTTP statuses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from serving import Server, module_server

SYSTEM = "You are a terse assistant for a hardware store. Name the aisle of every item you mention. " * 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from module_server(tmp_path_factory, "metrics", "--parallel", "2", "--api-key", "sesame")


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(wanted)}}} (\S+)$", text, re.M)
    assert match, f"{name}{{{wanted}}} missing from /metrics"
    return float(match.group(1))


def test_metrics_count_requests_tokens_latencies_and_statuses(server: Server, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0, timeout=60)
    replies = [client.chat.completions.create(model="smollm2", temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        for question in ("Where is the paint?", "Do you sell hammers?")]
    # The usage says so, as OpenAI reports its own cache: the second reused the system prompt.
    cached = [r.usage.prompt_tokens_details.cached_tokens for r in replies]  # type: ignore[union-attr]
    assert cached[0] == 0 and 50 < cached[1] < replies[1].usage.prompt_tokens  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[])
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # behind the API key, unlike /health
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer sesame"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric(text, "slm_requests_finished_total", model="smollm2") == 2
    assert metric(text, "slm_generated_tokens_total", model="smollm2") >= 2
    assert metric(text, "slm_sequences_running", model="smollm2") == 0
    # The second request found the shared system prompt in the prefix cache.
    assert metric(text, "slm_prefix_cache_hits_total", model="smollm2") == 1
    assert metric(text, "slm_prefix_cache_hit_tokens_total", model="smollm2") == cached[1]
    assert metric(text, "slm_time_to_first_token_seconds_count", model="smollm2") == 2
    assert metric(text, "slm_time_to_first_token_seconds_bucket", model="smollm2", le="+Inf") == 2
    assert metric(text, "slm_time_per_output_token_seconds_count", model="smollm2") >= 1
    assert metric(text, "slm_http_responses_total", path="/v1/chat/completions", status="200") == 2
    assert metric(text, "slm_http_responses_total", path="/v1/chat/completions", status="400") == 1
    assert metric(text, "slm_http_responses_total", path="/metrics", status="401") == 1
