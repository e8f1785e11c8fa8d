"""The course suite: what `python compare.py` runs when no --workload is named.

Each lesson's gain lives on its own workload (its "home"): the suite runs the throughput workload
for every engine, then each home workload for the two cycles of its step only, at a size chosen to
show the gain and to fit the budget: 7 minutes on a 2-core CPU, install and cycle 1 included (cycles
1-11 with the speculative and tensor_parallel parts took 182 s from an empty model cache on a 2-core AMD EPYC:
docs/results/cpu-course-suite-cycles1-11/), about 3 minutes on an H100/H200 (`python -m
common.benchmark.estimate --suite` prints the estimate per part).
Paging and int8 need no run of their own: their home metric is memory, which the throughput part
already measures. `--workload NAME` runs one workload, as a suite of one part.

Each size below is a named constant with the stored run it was chosen from (docs/results/).
"""

from dataclasses import dataclass, field

from common.benchmark.online import parse_rates

# -- CPU (SmolLM2-135M, fp32, 2 cores) ------------------------------------------------------------
# The budget counts the README's whole first command on a fresh 2-core AMD EPYC: the install took
# 126 s there and the one-time GGUF conversion ~30 s, which leaves the suite about 4 minutes. Every
# engine start costs ~6 s (torch's import, ~3 s of loading, warm-up), sixteen starts a minute and a half,
# so each part runs a few requests with short outputs: enough to show its lesson, no more.
#
# Cycle 1 reruns every sequence each step: 16 requests took 113-157 s (docs/results/cpu-throughput),
# 2 requests of 16-32 tokens 12 s (docs/results/cpu-course-suite); cycle 2 runs the same requests.
CPU_NAIVE_REQUESTS = 2
CPU_NAIVE_OUTPUT = (16, 32)
# Online: at 2 req/s the static server (cycle 3) is saturated while continuous batching is not:
# with 32 requests its p99 TTFT was 14.8 s against 0.31 s (docs/results/cpu-online-sweep, 30-34 s
# per engine). 8 requests of 16-48 tokens still queue behind cycle 3's batches (p99 TTFT 4.1 s
# against 0.29 s, 9-10 s per engine, docs/results/cpu-course-suite).
CPU_ONLINE_REQUESTS = 8
CPU_ONLINE_RATE = 2.0
CPU_ONLINE_OUTPUT = (16, 48)
# Prefix caching: 8 requests sharing the CPU size's 256-token system prompt, half the size's 16:
# every request after the first still finds the prefix cached (-79% TTFT in cpu-course-suite).
CPU_PREFIX_REQUESTS = 8
# Long context: one long prompt. Cycle 6 (sdpa) against cycle 5 (explicit attention): 5.6 s
# against 10.3 s at 2,048 tokens, 2.3 s against 3.8 s at 1,024 (docs/results/cpu-context-sweep),
# and cycle 6 is slower at 256 (sdpa's fixed cost). 1,024 keeps a clear margin.
CPU_LONG_PROMPT = 1024
CPU_LONG_REQUESTS = 1

# -- CUDA (Qwen3-0.6B, bf16, H100/H200), from common/benchmark/estimate.py -------------------------
# Cycle 1 on the full throughput size (256 requests): est. 28 s on an H200, so it needs no reduced
# size there. Engine start-up (~11 s each, measured) dominates the rest of the budget.
CUDA_NAIVE_REQUESTS = None
# Online: 50 requests at 10 req/s arrive over ~5 s; est. ~9 s of decode steps per engine.
CUDA_ONLINE_REQUESTS = 50
CUDA_ONLINE_RATE = 10.0
# Long context: 8 requests of 4,096-8,192 tokens (the CUDA size's lengths); est. ~5 s per engine.
CUDA_LONG_PROMPT = None
CUDA_LONG_REQUESTS = 8

# -- Tensor parallelism (cycle 11 against cycle 10, its tp=1) --------------------------------------
# The lesson's metric is the weight memory per rank, which a run of any length measures: the part
# only has to start both engines, so it runs 2 short requests (start-up is its cost: cycle 11 starts
# 2 more processes, each importing torch and loading and quantizing its shard). The size is the model's:
# each rank must hold whole heads. SmolLM2-135M (9 heads, 3 KV heads) splits over 1 or 3 ranks only,
# so the CPU part runs 3 ranks (on 2 cores they share the cores: memory, not speed, is the point).
# Qwen3-0.6B (16 heads, 8 KV heads) splits over 2. NCCL runs one rank per GPU, so on a machine with
# one GPU (the usual H100/H200) the part is left out rather than run at tp=1, where cycle 11 is
# cycle 10 and the row would measure nothing.
CPU_TP_SIZE = 3
CUDA_TP_SIZE = 2
TP_REQUESTS = 2
TP_OUTPUT = (8, 8)

# -- Speculative decoding (cycle 10 against cycle 9) --------------------------------------------------
# Its home is a request alone on the engine whose answer copies its prompt: the copy workload at
# max_num_seqs=1, fp32 (chapter 12's runs, docs/results/cpu-copy-batch1/: 8 requests, cycle 9 17.7 s
# and cycle 10 14 s with their loads). Half of them keep the part near 20 s. Cycle 9 takes no
# speculative_config and runs without it; both take max_num_seqs and quantization.
SPEC_CONFIG = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}'
SPEC_REQUESTS = 4

HF = ("hf_generate", "hf_generate_batch")
# The suite's throughput part: 8 engines, so its generation is kept short (6 requests of 16-32
# tokens; their varied lengths are what paging's KV memory gain lives on), and HF is represented by
# its stronger baseline, generate_batch (continuous batching of its own); `--workload throughput`
# runs both HF baselines at the full size.
CPU_THROUGHPUT_REQUESTS = 6
CPU_THROUGHPUT_OUTPUT = (16, 32)
SUITE_HF = ("hf_generate_batch",)


@dataclass(frozen=True)
class Part:
    """One workload run for some engines: a per-workload table, a folder of results."""
    name: str                        # the folder and the table's title
    workload: str
    cycles: tuple[int, ...] | None   # cycle numbers; None: every cycle present
    hf: tuple[str, ...] = ()         # the HF baselines it also runs
    vllm: bool = False               # also the real vLLM, when compare.py has one (--vllm-python)
    num_requests: int | None = None  # None: the workload size's own
    prompt_len: int | None = None
    output_len: tuple[int, int] | None = None   # the range of max_tokens; None: the size's own
    request_rates: tuple = (None,)   # online: the rates to run each engine at (None: the size's default)
    note: str = ""                   # printed under the part's table
    options: tuple[str, ...] = field(default_factory=tuple)


def suite(device_kind: str, quick: bool = False, num_gpus: int | None = None) -> list[Part]:
    """The course suite on a device ("cpu" or "cuda"); quick: every part at its smoke-test size.
    num_gpus: the GPUs the tensor-parallel part may use on CUDA (None: count them)."""
    cpu = device_kind == "cpu"
    naive_requests = None if quick else (CPU_NAIVE_REQUESTS if cpu else CUDA_NAIVE_REQUESTS)
    parts = []
    if naive_requests is None:   # cycle 1 can afford the full size: one throughput part for all
        parts.append(Part("throughput", "throughput", None, hf=SUITE_HF, vllm=True))
    else:
        parts.append(Part("throughput", "throughput", tuple(range(2, 100)), hf=SUITE_HF, vllm=True,
                          num_requests=None if quick else CPU_THROUGHPUT_REQUESTS,
                          output_len=None if quick else CPU_THROUGHPUT_OUTPUT,
                          note=f"cycle 1 runs a reduced size ({naive_requests} requests): see the kv_cache table"))
        parts.append(Part("kv_cache", "throughput", (1, 2), num_requests=naive_requests, output_len=CPU_NAIVE_OUTPUT,
                          note=f"the throughput workload reduced to {naive_requests} requests so cycle 1 fits "
                               "the budget; cycle 2 runs the same requests"))
    online_requests, rate = (CPU_ONLINE_REQUESTS, CPU_ONLINE_RATE) if cpu else (CUDA_ONLINE_REQUESTS, CUDA_ONLINE_RATE)
    long_prompt, long_requests = (CPU_LONG_PROMPT, CPU_LONG_REQUESTS) if cpu else (CUDA_LONG_PROMPT, CUDA_LONG_REQUESTS)
    parts += [
        Part("online", "online", (3, 4), num_requests=None if quick else online_requests,
             output_len=None if quick or not cpu else CPU_ONLINE_OUTPUT,
             request_rates=(None,) if quick else (rate,)),
        Part("shared_prefix", "shared_prefix", (4, 5), num_requests=None if quick or not cpu else CPU_PREFIX_REQUESTS),
        Part("long_context", "long_context", (5, 6), num_requests=None if quick else long_requests,
             prompt_len=None if quick else long_prompt),
    ]
    parts.append(Part("speculative", "copy", (9, 10), num_requests=None if quick else SPEC_REQUESTS,
                      options=(f"speculative_config={SPEC_CONFIG}", "max_num_seqs=1", "quantization=None"),
                      note="one request at a time, fp32; cycle 9 takes no speculative_config: it is the row "
                           "without speculation"))
    tp = tensor_parallel_size(device_kind, num_gpus)
    if tp is not None:
        parts.append(Part("tensor_parallel", "throughput", (10, 11), num_requests=None if quick else TP_REQUESTS,
                          output_len=None if quick else TP_OUTPUT, options=(f"tensor_parallel_size={tp}",),
                          note=f"cycle 11 at tensor_parallel_size={tp}; cycle 10 takes no such option: "
                               "it is the tp=1 row. weights MiB: rank 0's share"))
    return parts


def tensor_parallel_size(device_kind: str, num_gpus: int | None = None) -> int | None:
    """The ranks the tensor-parallel part runs cycle 11 on; None: the part is left out (one GPU)."""
    if device_kind == "cpu":
        return CPU_TP_SIZE
    if device_kind != "cuda":   # mps: one device, and no process group to split a model over
        return None
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    return CUDA_TP_SIZE if num_gpus >= CUDA_TP_SIZE else None


def part_engines(part: Part, cycles: list[str], hf_allowed: bool, vllm_allowed: bool = False) -> list[str]:
    """The engines a part runs: its cycles among those selected (--cycles), then the HF baselines,
    then vLLM."""
    from common.benchmark.report import cycle_number
    from common.benchmark.vllm_baseline import VLLM_ENGINE

    chosen = [c for c in cycles if part.cycles is None or cycle_number(c) in part.cycles]
    return chosen + (list(part.hf) if hf_allowed else []) + ([VLLM_ENGINE] if part.vllm and vllm_allowed else [])


def single_part(args) -> "Part":
    """compare.py --workload NAME: a suite of one part, every selected cycle (and HF but online, and vLLM)."""
    rates = (None,)
    if args.workload == "online" and args.request_rate:
        try:
            rates = tuple(parse_rates(args.request_rate))
        except ValueError as error:
            raise SystemExit(f"--request-rate: {error}")
    return Part(args.workload, args.workload, None, hf=HF if args.workload != "online" else (), vllm=True,
                num_requests=args.num_requests, prompt_len=args.prompt_len, output_len=args.output_len,
                request_rates=rates)
