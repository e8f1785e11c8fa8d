"""The online workload: requests arrive over time, and serving is measured as a user sees it.

Arrivals follow vLLM's benchmark_serving: the gaps between requests are gamma-distributed with
shape `burstiness` and mean 1 / request_rate (burstiness 1 is a Poisson process; below 1 the
requests come in bursts, above 1 more evenly), seeded so every engine sees the same schedule.

Two drivers replay the schedule against an engine:
- `drive_steps` (cycles 4 on, which have step()): before every step it adds each request whose
  arrival time has passed, so a request that arrives while others run joins at the next step;
- `drive_static` (cycles 1-3, generate() only): a static server. Whenever the engine is idle it
  takes what has arrived (up to max_num_seqs) as one batch; what arrives meanwhile waits for the
  whole batch, the slowest member included.

Both record, per request, its arrival, the time of every token and its finish, in seconds since
the first arrival; `serving_metrics` turns these into TTFT, TPOT, ITL, end-to-end latency,
throughput and goodput with the same definitions as vLLM's benchmark.
"""

import math
import random
import time
from dataclasses import dataclass, field

from common.benchmark.tables import cell, format_columns
from common.engine.metrics import percentile

# Request rate and latency targets of the default online run, per workload size (the lengths are
# SIZES["online"] in common/benchmark/workloads.py). The CPU size is chosen so that the static server
# (cycle 3) is saturated while continuous batching (cycle 4) is not: outputs of 16..128 tokens
# make every static batch wait ~128 steps for its slowest member, while at 1 request/s cycle 4
# holds only a few requests at a time. The SLOs sit between the two.
ONLINE_DEFAULTS = {
    "cpu": dict(request_rate=1.0, slo_ttft_s=2.0, slo_tpot_s=0.25),
    "cuda": dict(request_rate=10.0, slo_ttft_s=1.0, slo_tpot_s=0.05),
    "quick": dict(request_rate=math.inf, slo_ttft_s=5.0, slo_tpot_s=1.0),
}
ARRIVAL_SEED = 0


@dataclass
class RequestRecord:
    arrival_s: float                                         # when the request arrived
    token_times_s: list[float] = field(default_factory=list)  # when each output token was seen
    finish_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    num_output_tokens: int = 0                                # tokens generated (a chunk may carry several)


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0,
                  seed: int = ARRIVAL_SEED) -> list[float]:
    """Seconds after the start at which each request arrives: the first at 0, then gamma gaps with
    shape `burstiness` and mean 1 / request_rate. An infinite rate sends everything at 0."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)   # gamma scale: mean gap = shape * scale = 1 / rate
    times, now = [0.0], 0.0
    for _ in range(num_requests - 1):
        now += rng.gammavariate(burstiness, theta)
        times.append(now)
    return times


def parse_rates(spec: str) -> list[float]:
    """'1,2.5,inf' -> [1.0, 2.5, inf]."""
    rates = [float(s) for s in spec.split(",") if s.strip()]
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"request rates must be > 0 (or inf), got {spec!r}")
    return rates


def _wait_until(start: float, t: float, clock, sleep) -> None:
    delay = t - (clock() - start)
    if delay > 0:
        sleep(delay)


def drive_steps(llm, prompts: list[list[int]], params: list, arrivals: list[float],
                clock=time.perf_counter, sleep=time.sleep) -> list[RequestRecord]:
    """Replay the arrivals against an engine with add_request()/step() (cycles 4 on). Requests
    added this way are detokenized every step, as a streaming server's are: that cost is measured."""
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    records = [RequestRecord(arrivals[i]) for i in range(len(prompts))]
    by_id, nxt = {}, 0
    start = clock()
    while nxt < len(order) or llm.has_unfinished_requests():
        now = clock() - start
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            by_id[llm.add_request(prompts[i], params[i])] = i
            nxt += 1
        if not llm.has_unfinished_requests():   # idle: nothing to step until the next arrival
            _wait_until(start, arrivals[order[nxt]], clock, sleep)
            continue
        outputs = llm.step()
        now = clock() - start
        for out in outputs:
            rec = records[by_id[out.request_id]]
            rec.token_times_s += [now] * len(out.new_token_ids)
            rec.num_output_tokens += len(out.new_token_ids)
            if out.finished:
                rec.finish_s, rec.token_ids = now, list(out.token_ids)
    return records


def drive_static(llm, prompts: list[list[int]], params: list, arrivals: list[float], max_num_seqs: int,
                 clock=time.perf_counter, sleep=time.sleep, kv_peaks: list | None = None) -> list[RequestRecord]:
    """Replay the arrivals against a generate()-only engine as a static server (cycles 1-3).

    generate() reports each request's first-token and finish times but not the tokens in between,
    so the inner token times are spread evenly between those two: the TTFT, end-to-end latency and
    TPOT are exact, the ITL percentiles are those of an even spread. Each generate() reports its own
    batch's KV peak: kv_peaks, when given, receives every batch's (the run's peak is their max)."""
    order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
    records = [RequestRecord(arrivals[i]) for i in range(len(prompts))]
    nxt = 0
    start = clock()
    while nxt < len(order):
        now = clock() - start
        if arrivals[order[nxt]] > now:          # idle and nobody is waiting
            _wait_until(start, arrivals[order[nxt]], clock, sleep)
            continue
        batch = []
        while nxt < len(order) and len(batch) < max_num_seqs and arrivals[order[nxt]] <= now:
            batch.append(order[nxt])
            nxt += 1
        began = clock() - start
        outputs = llm.generate([prompts[i] for i in batch], [params[i] for i in batch])
        if kv_peaks is not None:
            kv_peaks.append(llm.stats.get("kv_cache_peak_bytes"))
        for i, out in zip(batch, outputs):
            first, last, n = began + out.metrics.ttft_s, began + out.metrics.latency_s, len(out.token_ids)
            rec = records[i]
            rec.token_times_s = [first + (last - first) * k / max(1, n - 1) for k in range(n)]
            rec.num_output_tokens, rec.finish_s, rec.token_ids = n, last, list(out.token_ids)
    return records


def serving_metrics(records: list[RequestRecord], slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """vLLM benchmark_serving's definitions, over the requests that finished:
    TTFT = first token - arrival; E2EL = finish - arrival; TPOT = (E2EL - TTFT) / (tokens - 1)
    (requests of one token have none); ITL = gaps between consecutive token (or chunk) times;
    duration = first arrival (0) to last finish; goodput = requests meeting both SLOs per second."""
    done = [r for r in records if r.finish_s is not None and r.token_times_s]
    ttft = [r.token_times_s[0] - r.arrival_s for r in done]
    e2el = [r.finish_s - r.arrival_s for r in done]
    tpot = [(e - t) / (r.num_output_tokens - 1) for r, t, e in zip(done, ttft, e2el) if r.num_output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    duration = max((r.finish_s for r in done), default=0.0)
    good = sum(1 for r, t, e in zip(done, ttft, e2el)
               if t <= slo_ttft_s and (r.num_output_tokens <= 1 or (e - t) / (r.num_output_tokens - 1) <= slo_tpot_s))
    tokens = sum(r.num_output_tokens for r in done)

    def rate(count):
        return count / duration if duration > 0 else None

    return {
        "completed": len(done), "failed": len(records) - len(done), "duration_s": duration,
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_s": sum(tpot) / len(tpot) if tpot else None, "tpot_p99_s": percentile(tpot, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "e2el_mean_s": sum(e2el) / len(e2el) if e2el else None,
        "e2el_p50_s": percentile(e2el, 50), "e2el_p99_s": percentile(e2el, 99),
        "request_throughput": rate(len(done)), "output_throughput": rate(tokens),
        "goodput": rate(good), "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s,
    }


def online_settings(size_key: str, request_rate: float | None, burstiness: float,
                    slo_ttft_s: float | None, slo_tpot_s: float | None) -> dict:
    """The run's rate and SLOs: the given ones, else this size's defaults."""
    d = ONLINE_DEFAULTS[size_key]
    return {"request_rate": d["request_rate"] if request_rate is None else request_rate,
            "burstiness": burstiness,
            "slo_ttft_s": d["slo_ttft_s"] if slo_ttft_s is None else slo_ttft_s,
            "slo_tpot_s": d["slo_tpot_s"] if slo_tpot_s is None else slo_tpot_s}


def online_row(records: list[RequestRecord], settings: dict) -> dict:
    """The fields an online result adds (and the per-request lists the timeline chart draws)."""
    metrics = serving_metrics(records, settings["slo_ttft_s"], settings["slo_tpot_s"])
    return {**metrics, "request_rate": settings["request_rate"], "burstiness": settings["burstiness"],
            "arrival_s": [r.arrival_s for r in records],
            "first_token_s": [r.token_times_s[0] if r.token_times_s else None for r in records],
            "finish_s": [r.finish_s for r in records]}


def run_online_engine(llm, engine_module, work, settings: dict, seed: int = ARRIVAL_SEED,
                      kv_peaks: list | None = None) -> list[RequestRecord]:
    """Replay the workload's requests, greedy, at the settings' rate against an engine. kv_peaks:
    see drive_static (an engine with step() reports its run's KV peak itself, in llm.load())."""
    arrivals = arrival_times(len(work.requests), settings["request_rate"], settings["burstiness"], seed)
    prompts = [r.prompt_token_ids for r in work.requests]
    params = [engine_module.SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=r.ignore_eos)
              for r in work.requests]
    if hasattr(llm, "step"):
        return drive_steps(llm, prompts, params, arrivals)
    return drive_static(llm, prompts, params, arrivals, llm.config.max_num_seqs, kv_peaks=kv_peaks)


def _same_tokens_cell(r: dict) -> str:
    """compare.py's verdict (r["same_tokens"]) or, for a server measured over HTTP, its own field."""
    return (r.get("same_tokens") or {}).get("cell") or r.get("same_tokens_as_c1", "-")


def format_online_table(results: list[dict]) -> str:
    """One row per (engine, request rate)."""
    header = ["engine", "rate req/s", "TTFT p50 s", "TTFT p99 s", "TPOT mean s", "ITL p99 s", "E2EL p99 s",
              "req/s", "tok/s", "goodput req/s", "same tokens as c1"]
    rows = [[r["engine"], cell(r.get("request_rate"), fmt="{:g}"), cell(r.get("ttft_p50_s")), cell(r.get("ttft_p99_s")),
             cell(r.get("tpot_mean_s")), cell(r.get("itl_p99_s")), cell(r.get("e2el_p99_s")),
             cell(r.get("request_throughput")), cell(r.get("output_throughput"), fmt="{:.1f}"),
             cell(r.get("goodput")), _same_tokens_cell(r)] for r in results]
    lines = format_columns(header, rows)
    if results:
        r = results[0]
        lines.append(f"goodput: requests with TTFT <= {r['slo_ttft_s']:g} s and TPOT <= {r['slo_tpot_s']:g} s, "
                     f"per second; burstiness {r['burstiness']:g}")
    return "\n".join(lines)
