"""Prometheus metrics for GET /metrics (prometheus-client, one registry per server):

    flashmoe_requests_total{path,status}        HTTP requests answered
    flashmoe_prompt_tokens_total, flashmoe_generated_tokens_total, flashmoe_cached_prompt_tokens_total
    flashmoe_time_to_first_token_seconds        histogram, per finished generation
    flashmoe_inter_token_latency_seconds        histogram, per finished generation (decode time / tokens)
    flashmoe_queue_depth, flashmoe_batch_size   sequences waiting / decoding now (read at scrape time)
    flashmoe_engine_steps_total, flashmoe_expert_bytes_read_total, flashmoe_expert_reads_total
    flashmoe_optimistic_decode_steps_total{result="hit"|"miss"}   decode steps whose experts were all
                                                resident in the expert cache (hit) or not (miss)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """The engine's own counters, read when Prometheus scrapes."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model

    def collect(self):
        c = self.engine.counters
        yield GaugeMetricFamily("flashmoe_queue_depth", "sequences waiting for a batch row", value=c.get("waiting", 0))
        yield GaugeMetricFamily("flashmoe_batch_size", "sequences being decoded together", value=c.get("running", 0))
        yield CounterMetricFamily("flashmoe_engine_steps", "batched engine steps", value=c.get("steps", 0))
        yield CounterMetricFamily("flashmoe_expert_bytes_read", "bytes of expert records read from the bundle",
                                  value=c.get("expert_bytes", 0))
        stats = getattr(self.model, "stats", None)
        yield CounterMetricFamily("flashmoe_expert_reads", "expert records read (expert-cache misses)",
                                  value=getattr(stats, "expert_reads", 0))
        experts = getattr(self.model, "experts", None)
        opt = CounterMetricFamily("flashmoe_optimistic_decode_steps",
                                  "decode steps whose routed experts were all resident (hit) or not (miss)",
                                  labels=["result"])
        opt.add_metric(["hit"], getattr(experts, "optimistic_hits", 0))
        opt.add_metric(["miss"], getattr(experts, "optimistic_misses", 0))
        yield opt


class Metrics:
    def __init__(self, engine, model):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("flashmoe_requests", "HTTP requests answered", ["path", "status"], registry=r)
        self.prompt_tokens = Counter("flashmoe_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.cached_tokens = Counter("flashmoe_cached_prompt_tokens", "prompt tokens reused from the prompt cache",
                                     registry=r)
        self.generated_tokens = Counter("flashmoe_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("flashmoe_time_to_first_token_seconds", "time from admission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("flashmoe_inter_token_latency_seconds", "mean time between a generation's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine, model))

    def request(self, path: str, status: int) -> None:
        known = path in ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses", "/v1/models",
                         "/health", "/metrics", "/")
        self.requests.labels(path if known else "other", str(status)).inc()

    def generation(self, stats: dict) -> None:
        g = int(stats.get("generated_tokens", 0))
        self.prompt_tokens.inc(int(stats.get("prompt_tokens", 0)))
        self.cached_tokens.inc(int(stats.get("cached_prompt_tokens", 0)))
        self.generated_tokens.inc(g)
        if stats.get("ttft_s") is not None:
            self.ttft.observe(float(stats["ttft_s"]))
        if g > 1 and stats.get("decode_s"):
            self.itl.observe(float(stats["decode_s"]) / (g - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
