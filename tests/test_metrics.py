"""/metrics after a known workload: counters equal the work done, histograms count every request,
gauges return to idle; JSON log lines carry each request's fields."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import running_server

PROMPTS = [[1, *range(10, 10 + length)] for length in (5, 17, 40)]  # token-id prompts of known length
MAX_TOKENS = [7, 12, 20]


@pytest.fixture(scope="module")
def served(tiny_model):
    """Run the workload once; return the scraped samples, the engine's stats and the log."""
    with running_server(tiny_model("llama"), "--kv-cache-memory", "16MiB", "--served-model-name", "tiny",
                        "--log-format", "json") as srv:
        client = srv.client()
        for prompt, max_tokens in zip(PROMPTS, MAX_TOKENS):
            client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, extra_body={"ignore_eos": True})
        streamed = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=9, stream=True,
                                             extra_body={"ignore_eos": True})
        assert len("".join(c.choices[0].text for c in streamed if c.choices)) > 0
        json_sizes = [client.completions.create(model="tiny", prompt="Say", max_tokens=30, seed=i,
                                                extra_body={"response_format": {"type": "json_object"}}).usage
                      for i in range(2)]
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="hi", max_tokens=-1)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="hi", max_tokens=1)
        text = httpx.get(f"{srv.url}/metrics").text
        stats = srv.stats()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "le"))))
                if "le" not in s.labels:
                    samples[key] = s.value
                assert s.labels.get("model_name") == "tiny", s
        yield samples, stats, json_sizes, srv.log_text()


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_equal_the_work_done(served):
    samples, stats, json_sizes, _ = served
    prompt_lens = [len(p) for p in PROMPTS] + [len(PROMPTS[2])] + [u.prompt_tokens for u in json_sizes]
    generated = MAX_TOKENS + [9] + [u.completion_tokens for u in json_sizes]
    assert value(samples, "kvserve:prompt_tokens_total") == sum(prompt_lens) == stats["prompt_tokens"]
    assert value(samples, "kvserve:generation_tokens_total") == sum(generated) == stats["generation_tokens"]
    finished = sum(value(samples, "kvserve:request_success_total", finished_reason=r) for r in ("length", "stop")
                   if ("kvserve:request_success_total", (("finished_reason", r),)) in samples)
    assert finished == len(prompt_lens) == 6
    assert value(samples, "kvserve:request_errors_total", code="400") == 1
    assert value(samples, "kvserve:request_errors_total", code="404") == 1
    assert value(samples, "kvserve:http_requests_total", route="/v1/completions", status="200") == 6
    assert value(samples, "kvserve:prefix_cache_hits_total") == stats["prefix_cache_hits"] >= 32  # PROMPTS[2] twice
    assert value(samples, "kvserve:prefix_cache_queries_total") == stats["prefix_cache_queries"]


def test_histograms_count_every_request(served):
    samples, _, json_sizes, _ = served
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert value(samples, f"kvserve:{name}_count") == 6, name
    generated = sum(MAX_TOKENS) + 9 + sum(u.completion_tokens for u in json_sizes)
    assert value(samples, "kvserve:request_generation_tokens_sum") == generated
    # One gap per token after each request's first (jump-forward tokens count as zero-length gaps).
    assert value(samples, "kvserve:inter_token_latency_seconds_count") == generated - 6
    assert value(samples, "kvserve:structured_output_compile_seconds_count") == 2
    assert value(samples, "kvserve:structured_output_grammar_cache_hits_total") == 1  # the second json_object


def test_gauges_return_to_idle(served):
    samples, _, _, _ = served
    assert value(samples, "kvserve:num_requests_running") == 0
    assert value(samples, "kvserve:num_requests_waiting") == 0
    assert value(samples, "kvserve:kv_cache_usage_perc") == 0


def test_json_log_lines_carry_request_fields(served):
    _, _, _, log = served
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    requests = [line for line in lines if "request_id" in line]
    assert len(requests) == 6  # the 400 and the 404 are refused before any engine work
    first = requests[0]
    assert first["request_id"].startswith("cmpl-") and first["prompt_tokens"] == len(PROMPTS[0])
    assert first["completion_tokens"] == MAX_TOKENS[0] and first["finish_reason"] == "length"
    assert 0 <= first["queue_ms"] <= first["ttft_ms"] <= first["total_ms"]
