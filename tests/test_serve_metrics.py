"""GET /metrics: Prometheus text, parsed with prometheus-client's own parser, counting what was served."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from test_serve import MODEL, live  # noqa: F401  (a fixture)


def _scrape(live) -> dict:
    r = httpx.get(live.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_tokens_and_latencies(live):
    before = _scrape(live)
    oa = live.openai()
    r1 = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    r2 = oa.completions.create(model=MODEL, prompt="The quick", max_tokens=4)
    httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL}, timeout=10)  # a 400
    after = _scrape(live)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("flashmoe_requests_total", path="/v1/chat/completions", status="200") == 1
    assert delta("flashmoe_requests_total", path="/v1/completions", status="200") == 1
    assert delta("flashmoe_requests_total", path="/v1/chat/completions", status="400") == 1
    assert delta("flashmoe_generated_tokens_total") == r1.usage.completion_tokens + r2.usage.completion_tokens
    assert delta("flashmoe_prompt_tokens_total") == r1.usage.prompt_tokens + r2.usage.prompt_tokens
    assert delta("flashmoe_time_to_first_token_seconds_count") == 2
    assert delta("flashmoe_inter_token_latency_seconds_count") == 2
    assert delta("flashmoe_engine_steps_total") >= 4
    assert after[("flashmoe_queue_depth", ())] == 0 and after[("flashmoe_batch_size", ())] == 0
    assert delta("flashmoe_expert_bytes_read_total") > 0 and ("flashmoe_expert_reads_total", ()) in after
