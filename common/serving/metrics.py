"""/metrics: Prometheus text under vLLM's metric names.

Two sources. The front end times every request from its stream (no engine change needed): it
sees a request arrive, its first token, each later token and its end, which gives the latency
histograms, the token counters and the finished requests by reason. The engine's `snapshot`
(a dict it replaces after every step) gives what only the engine knows:

    num_requests_running, num_requests_waiting, kv_cache_usage_perc   gauges, now
    num_preemptions                                                     total since start
    prefix_cache_queries, prefix_cache_hits                             tokens, since start (cycle 5 on)
    spec_decode_num_drafts, _num_draft_tokens, _num_accepted_tokens    since start (cycle 10, speculating)

and each request's first delta carries `queue_time_s`: from its arrival in the engine to the
start of the step that ran its prefill (vLLM's queue time). A counter or a queue time the engine
does not report is left out (the series is absent, or the histogram stays empty), never shown as 0.

A prompt's tokens are counted when its first token arrives, i.e. when its prefill has run (a
request aborted while waiting never counts), as vLLM counts them.
"""

import bisect
import time

# vLLM's bucket bounds, in seconds (vllm/v1/metrics/buckets.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def escape(value: str) -> str:
    """A label value in Prometheus' text format: backslash, double quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)     # the last one: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, labels: str) -> list[str]:
        out = [f"# HELP vllm:{self.name} {self.help}", f"# TYPE vllm:{self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            out.append(f'vllm:{self.name}_bucket{{{labels},le="{_number(bound)}"}} {cumulative}')
        return out + [f"vllm:{self.name}_sum{{{labels}}} {self.sum!r}", f"vllm:{self.name}_count{{{labels}}} {self.count}"]


class RequestTimer:
    """One request's times, as its stream sees them (perf_counter seconds)."""

    def __init__(self, num_prompt_tokens: int, arrival: float | None = None):
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.last_token: float | None = None
        self.ended = False


class ServerMetrics:
    def __init__(self, model: str):
        self.model = model
        self.ttft = Histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Arrival to last token of finished requests.",
                             REQUEST_BUCKETS)
        self.queue = Histogram("request_queue_time_seconds", "Arrival in the engine to the start of the prefill.",
                               REQUEST_BUCKETS)
        self.prompt_tokens = self.generation_tokens = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)

    def on_delta(self, timer: RequestTimer, delta) -> None:
        now = time.perf_counter()
        if timer.last_token is None:
            self.ttft.observe(now - timer.arrival)
            self.prompt_tokens += timer.num_prompt_tokens
            if getattr(delta, "queue_time_s", None) is not None:
                self.queue.observe(delta.queue_time_s)
        else:
            self.itl.observe(now - timer.last_token)
        timer.last_token = now
        self.generation_tokens += len(delta.new_token_ids)
        if delta.finished:
            self.e2e.observe(now - timer.arrival)
            self.on_end(timer, delta.finish_reason or "stop")

    def on_end(self, timer: RequestTimer, reason: str) -> None:
        """A request ended: finished (stop/length), aborted (its client left) or failed (error)."""
        if not timer.ended:
            timer.ended = True
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def render(self, snapshot: dict) -> str:
        labels = f'model_name="{escape(self.model)}"'
        lines = []

        def scalar(name, kind, help_text, value, extra=""):
            lines.extend([f"# HELP vllm:{name} {help_text}", f"# TYPE vllm:{name} {kind}",
                          f"vllm:{name}{{{labels}{extra}}} {value}"])

        scalar("num_requests_running", "gauge", "Requests in the running batch.", snapshot["num_requests_running"])
        scalar("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", snapshot["num_requests_waiting"])
        scalar("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).",
               snapshot["kv_cache_usage_perc"])
        scalar("prompt_tokens_total", "counter", "Prompt tokens of the requests whose prefill ran.", self.prompt_tokens)
        scalar("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        if "num_preemptions" in snapshot:          # shown only when the engine counts them: never a made-up 0
            scalar("num_preemptions_total", "counter", "Preemptions since start.", snapshot["num_preemptions"])
        if "prefix_cache_queries" in snapshot:      # cycle 5 on
            scalar("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                   snapshot["prefix_cache_queries"])
            scalar("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                   snapshot["prefix_cache_hits"])
        if "spec_decode_num_drafts" in snapshot:    # cycle 10, speculative decoding on
            for name, help_text in (("num_drafts", "Verifications of draft tokens."),
                                    ("num_draft_tokens", "Draft tokens proposed."),
                                    ("num_accepted_tokens", "Draft tokens accepted.")):
                scalar(f"spec_decode_{name}_total", "counter", help_text, snapshot[f"spec_decode_{name}"])
            name = "spec_decode_num_accepted_tokens_per_pos_total"
            lines += [f"# HELP vllm:{name} Draft tokens accepted, by draft position.", f"# TYPE vllm:{name} counter"]
            lines += [f'vllm:{name}{{{labels},position="{p}"}} {n}'
                      for p, n in enumerate(snapshot["spec_decode_num_accepted_tokens_per_pos"])]
        lines += ["# HELP vllm:request_success_total Requests ended, by finish reason.",
                  "# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{{labels},finished_reason="{escape(reason)}"}} {n}'
                  for reason, n in self.finished.items()]
        for histogram in (self.ttft, self.itl, self.e2e, self.queue):
            lines += histogram.lines(labels)
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name without `vllm:`: value}, for tests and benchmarks. A series with
    labels besides model_name keeps them: 'request_success_total{finished_reason="stop"}'."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        rest = [p for p in _split_labels(labels.rstrip("}")) if not p.startswith("model_name=")]
        key = name.removeprefix("vllm:") + ("{" + ",".join(rest) + "}" if rest else "")
        values[key] = float(value)
    return values


def _split_labels(labels: str) -> list[str]:
    """'a="x,y",b="z"' -> ['a="x,y"', 'b="z"'] (commas inside quoted values kept)."""
    parts, current, quoted, escaped = [], "", False, False
    for ch in labels:
        if ch == "," and not quoted:
            parts.append(current)
            current = ""
            continue
        current += ch
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
    return parts + ([current] if current else [])
