"""Prometheus metrics at ``/metrics``, named like vLLM's under the ``kvserve:`` prefix.

Two sources. The engine's cumulative counters and gauges (tokens, preemptions, prefix cache, KV
usage, queue lengths) are read from ``EngineStats`` at scrape time, so they can never drift from
the engine's own numbers. Per-request latencies and sizes are observed by the HTTP layer when a
request finishes (its ``RequestTimes``) and per streamed delta (inter-token latency).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import RequestOutput
from engine.outputs import EngineStats

# From a 1 ms GPU decode step to a multi-minute CPU request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
TOKEN_BUCKETS = tuple(2 ** i for i in range(16))


class EngineCollector(Collector):
    """The engine's own counters, read when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name, self.stats = model_name, stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        counters = {
            "prompt_tokens": ("prompt tokens processed", s.prompt_tokens),
            "generation_tokens": ("tokens generated", s.generation_tokens),
            "num_preemptions": ("requests preempted (KV recomputed later)", s.num_preemptions),
            "prefix_cache_queries": ("prompt tokens looked up in the prefix cache", s.prefix_cache_queries),
            "prefix_cache_hits": ("prompt tokens found in the prefix cache", s.prefix_cache_hits),
            "jump_forward_tokens": ("tokens a grammar forced, appended without sampling", s.jump_forward_tokens),
            "spec_decode_num_drafts": ("request-steps that drafted tokens (speculative decoding)", s.spec.num_drafts),
            "spec_decode_num_draft_tokens": ("tokens proposed by speculative decoding", s.spec.draft_tokens),
            "spec_decode_num_accepted_tokens": ("speculative tokens accepted", s.spec.accepted_tokens),
            "spec_decode_num_switches": ("times the adaptive policy turned speculation on or off", s.spec.switches),
        }
        gauges = {
            "num_requests_running": ("requests in the running batch", s.num_running),
            "num_requests_waiting": ("requests waiting to be scheduled", s.num_waiting),
            "kv_cache_usage_perc": ("fraction of KV cache blocks in use (0..1)", s.kv_cache_usage),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(f"kvserve:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(f"kvserve:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        per_position = {"num_accepted_tokens_per_pos": ("drafts accepted at each draft position", s.spec.accepted_per_position),
                        "num_draft_tokens_per_pos": ("drafts proposed at each draft position", s.spec.drafted_per_position)}
        for name, (doc, values) in per_position.items():
            family = CounterMetricFamily(f"kvserve:spec_decode_{name}", doc, labels=["model_name", "position"])
            for position, value in enumerate(values):
                family.add_metric([self.model_name, str(position)], value)
            yield family
        if s.max_loras:  # vLLM's shape: the adapters as comma-joined labels, the value the scrape's time
            family = GaugeMetricFamily("kvserve:lora_requests_info", "LoRA adapters of running and waiting requests",
                                       labels=["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            family.add_metric([self.model_name, str(s.max_loras), ",".join(s.running_loras), ",".join(s.waiting_loras)],
                              time.time())
            yield family


class Metrics:
    """One registry per server (not the process-global one), so servers and tests never share series."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(model_name, stats))

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(f"kvserve:{name}", doc, ["model_name", *labels], registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"kvserve:{name}", doc, ["model_name"], buckets=buckets, registry=self.registry)

        self.request_success = counter("request_success", "finished requests", "finished_reason")
        self.request_errors = counter("request_errors", "HTTP responses with an error status", "code")
        self.http_requests = counter("http_requests", "HTTP requests", "route", "status")
        self.grammar_cache_hits = counter("structured_output_grammar_cache_hits", "grammars found already compiled")
        self.lora_requests = counter("lora_requests", "generation requests per LoRA adapter", "lora_name")
        self.tool_call_parse_failures = counter("tool_call_parse_failures", "tool calls left unfinished (cut off)")
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first token", LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "gap between streamed tokens", LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to last token", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "arrival to first scheduled", LATENCY_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "first scheduled to first token", LATENCY_BUCKETS)
        self.decode = histogram("request_decode_time_seconds", "first token to last token", LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "prompt length per request", TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "tokens generated per request", TOKEN_BUCKETS)
        self.compile = histogram("structured_output_compile_seconds", "grammar compile time per request", LATENCY_BUCKETS)

    def labels(self, metric, **labels: str):
        return metric.labels(model_name=self.model_name, **labels)

    def observe_tokens(self, gap: float, num_tokens: int) -> None:
        """Inter-token latency as the client sees it: ``gap`` since the choice's previous delta, once
        per token (a jump-forward delta brings several tokens at once: the first pays the gap)."""
        self.labels(self.itl).observe(gap)
        for _ in range(num_tokens - 1):
            self.labels(self.itl).observe(0.0)

    def observe_finished(self, out: RequestOutput, prompt_tokens: int, arrival: float) -> None:
        self.labels(self.request_success, finished_reason=out.finish_reason or "abort").inc()
        self.labels(self.prompt_tokens).observe(prompt_tokens)
        self.labels(self.generation_tokens).observe(out.num_output_tokens)
        t = out.times
        if t is None:
            return
        if t.first_scheduled is not None:
            self.labels(self.queue).observe(t.first_scheduled - arrival)
        if t.first_token is not None:
            self.labels(self.ttft).observe(t.first_token - arrival)
            if t.first_scheduled is not None:
                self.labels(self.prefill).observe(t.first_token - t.first_scheduled)
            if t.last_token is not None:
                self.labels(self.decode).observe(t.last_token - t.first_token)
                self.labels(self.e2e).observe(t.last_token - arrival)


class HTTPMetrics:
    """Pure ASGI middleware: counts every response by route and status, and errors by code."""

    def __init__(self, app, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "unmatched"  # bounded label values

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = str(message["status"])
                self.metrics.labels(self.metrics.http_requests, route=route, status=status).inc()
                if message["status"] >= 400:
                    self.metrics.labels(self.metrics.request_errors, code=status).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
