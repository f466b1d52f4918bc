"""slm bench and slm compare, through the command line, on the embedded model (and Gemma 3 270M)."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from PIL import Image

from test_cli import one_line_error, slm_cmd

TINY = ["-p", "16", "-n", "4", "-r", "2", "--threads", "1"]


def test_bench_reports_every_figure_as_json_csv_and_a_png(tmp_path: Path) -> None:
    plot, table = tmp_path / "bench.png", tmp_path / "bench.csv"
    result = slm_cmd("bench", "smollm2", *TINY, "--concurrency", "1,2", "--json", "--plot", str(plot),
                     "--csv", str(table))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["memory_gib"] > 0 and machine["cpu"]
    assert machine["memory_bandwidth_bytes_per_s"] > 1e8  # at least 0.1 GB/s: a real measurement
    assert {"slm", "llama-cpp-python"} <= set(machine["versions"])
    assert report["settings"] == {"prompt_tokens": 16, "generate_tokens": 4, "threads": 1, "ctx_size": None,
                                  "repetitions": 2, "concurrency": [1, 2]}
    [row] = report["results"]
    assert row["model"] == "smollm2" and row["engine"] == "llama.cpp" and row["architecture"] == "llama"
    assert row["parameters"] > 100e6 and row["size_bytes"] > 90e6 and len(row["sha256"]) == 64
    for key in ("pp", "tg", "ttft"):
        assert row[key]["mean"] > 0 and row[key]["std"] >= 0
    assert len(row["runs"]) == 2 and all(run["tg"] > 0 for run in row["runs"])
    assert 50e6 < row["peak_rss_bytes"] < 4e9
    assert set(row["concurrency"]) == {"1", "2"} and all(v > 0 for v in row["concurrency"].values())
    assert 0 < row["efficiency"] < 1.5  # tokens/s x bytes per token / copy bandwidth
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
    [line] = list(csv.DictReader(table.open()))
    assert line["model"] == "smollm2" and line["status"] == "ok" and float(line["tg_mean"]) > 0
    assert float(line["concurrency_2"]) > 0


def test_bench_prints_a_table_and_reports_a_failed_model_beside_the_others(tmp_path: Path) -> None:
    result = slm_cmd("bench", "smollm2", "no-such-model", *TINY, env=None)
    assert result.returncode == 1  # one of them failed
    assert "smollm2" in result.stdout and "tg tok/s" in result.stdout
    assert "no-such-model on auto failed: unknown model 'no-such-model'" in " ".join(result.stdout.split())
    assert "Traceback" not in result.stdout + result.stderr
    as_json = json.loads(slm_cmd("bench", "no-such-model", "smollm2", *TINY, "--json").stdout)
    assert [("error" in r) for r in as_json["results"]] == [True, False]


def test_bench_refuses_bad_requests_before_any_work(tmp_path: Path) -> None:
    one_line_error(slm_cmd("bench", "smollm2", "-p", "9000", "-n", "16"), "-p", "9000", "context of 8192")
    one_line_error(slm_cmd("bench", "smollm2", "-p", "60", "-n", "10", "--ctx-size", "64"), "exceed", "64")
    one_line_error(slm_cmd("bench", "smollm2", "-n", "1"), "-n", "at least 2")
    one_line_error(slm_cmd("bench", "smollm2", "--concurrency", "0"), "--concurrency")
    one_line_error(slm_cmd("bench", "smollm2", "--plot", str(tmp_path / "missing" / "b.png")), "--plot", "missing")
    one_line_error(slm_cmd("bench", "smollm2", "--plot", str(tmp_path / "b.jpg")), "--plot", ".png")
    one_line_error(slm_cmd("bench", "smollm2", "--csv", str(tmp_path / "nowhere" / "b.csv")), "--csv")
    assert not list(tmp_path.iterdir())  # nothing written


def test_compare_writes_a_report_with_every_answer(tmp_path: Path, gemma_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nName a colour of the sky.\n")
    for suffix in ("md", "html"):
        out = tmp_path / f"report.{suffix}"
        result = slm_cmd("compare", "smollm2", str(gemma_path), "--prompts", str(prompts), "--max-tokens", "12",
                         "--threads", "1", "--out", str(out), "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["prompts"] == ["What is the capital of France?", "Name a colour of the sky."]
        text = out.read_text()
        answers = [a for model in report["models"] for a in model["answers"]]
        assert len(answers) == 4
        for answer in answers:
            assert answer["text"] and answer["latency"] > 0 and answer["completion_tokens"] >= 1
            if suffix == "html":
                shown = html.escape(answer["text"])
            else:
                shown = html.escape(answer["text"], quote=False).replace("|", "\\|").replace("`", "\\`")
                shown = shown.replace("\n", "<br>")
            assert shown in text
        assert all(m["size_bytes"] > 0 and m["engine"] == "llama.cpp" for m in report["models"])
        if suffix == "html":
            assert text.count("<svg") == 2 and "<script" not in text  # charts inline, self-contained
    table = slm_cmd("compare", "smollm2", "--prompt", "Hi", "--max-tokens", "6", "--threads", "1")
    assert table.returncode == 0 and "mean latency" in table.stdout


def test_compare_refuses_bad_requests(tmp_path: Path) -> None:
    one_line_error(slm_cmd("compare", "smollm2"), "--prompt")
    one_line_error(slm_cmd("compare", "smollm2", "--prompt", "x", "--out", str(tmp_path / "r.pdf")), ".html")
    one_line_error(slm_cmd("compare", "smollm2", "--prompts", str(tmp_path / "absent.txt")), "cannot read")
