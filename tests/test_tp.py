"""Cycle 11, tensor parallelism: each parallel layer equals its dense version at world sizes 1, 2
and 3 (gloo, one process per rank), the engine at tp=N gives tp=1's tokens (tiny models and the real
SmolLM2, with prefix caching, chunked prefill and speculative decoding), tp=1 gives cycle 10's, a
model whose heads do not divide is refused before any loading, and two torchrun node groups on the
loopback address give one process's tokens. Process lifecycle: tests/test_tp_lifecycle.py."""

import multiprocessing
import os
import queue
import shutil
import subprocess
import sys
import traceback

import pytest
import torch

from conftest import SMOLLM2, cycle, free_port, save_tiny_checkpoint

TP = "cycle11_tp"
JOIN_TIMEOUT_S = 240     # a bound on every wait for a rank process, not a speed assertion

# 6 query heads and 6 KV heads of 16 (hidden 96), 96 MLP channels: divisible by 1, 2 and 3, and every
# row-parallel slice a multiple of 16 wide (what torch's int8 kernel needs).
DIVISIBLE = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=6, head_dim=16, intermediate_size=96)


@pytest.fixture(scope="module")
def tiny_tp(tmp_path_factory):
    paths = {}
    for arch in ("qwen3", "llama"):
        paths[arch] = str(tmp_path_factory.mktemp(f"tp-{arch}"))
        save_tiny_checkpoint(paths[arch], arch, **DIVISIBLE)
    return paths


# --- each layer against its dense version, one process per rank ---------------------------------

def _layers_on_rank(rank: int, world_size: int, port: int, results) -> None:
    try:
        from cycle11_tp.parallel_layers import ParallelLMHead, RowParallelLinear, Shard, VocabParallelEmbedding
        from cycle11_tp.parallel_state import connect_store, join_group
        from cycle11_tp.quantization import Int8Linear, quantize_absmax

        store, _ = connect_store("127.0.0.1", port, world_size, host_store=False)
        tp = join_group(store, rank, world_size, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)        # the same whole tensors on every rank
        x = torch.randn(5, 96, generator=gen)
        w, b = torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
        table = torch.randn(50, 64, generator=gen)   # 50 rows: not divisible by 2 or 3 (padding)
        ids = torch.randint(0, 50, (7,), generator=gen)
        cols = 96 // world_size
        mine = slice(rank * cols, (rank + 1) * cols)
        checks = {}

        column = torch.nn.Linear(96, 64 // world_size)         # column-parallel: a plain Linear of my rows
        Shard(column.weight, w.shape, 0, rank * (64 // world_size), 64 // world_size).copy_(w)
        Shard(column.bias, b.shape, 0, rank * (64 // world_size), 64 // world_size).copy_(b)
        with torch.no_grad():
            out = column(x)
        rows = slice(rank * (64 // world_size), (rank + 1) * (64 // world_size))
        checks["column"] = (out - (x @ w.T + b)[:, rows]).abs().max().item()

        row = RowParallelLinear(96, 64, True, tp)
        Shard(row.linear.weight, w.shape, 1, rank * cols, cols).copy_(w)
        with torch.no_grad():
            row.bias.copy_(b)
            checks["row"] = (row(x[:, mine]) - (x @ w.T + b)).abs().max().item()

        # int8: the row-parallel slice quantized with the whole rows' scales is the dense int8 layer
        q_all, s_all = quantize_absmax(w)
        q, s = quantize_absmax(w[:, mine], tp.all_reduce_max)
        checks["int8_scales"] = (s - s_all).abs().max().item() + (q.int() - q_all[:, mine].int()).abs().max().item()
        dense = Int8Linear(q_all, s_all, None, "cast")(x)
        sharded = tp.all_reduce(Int8Linear(q, s, None, "cast")(x[:, mine]).contiguous())
        checks["int8_row"] = (sharded - dense).abs().max().item()

        embed = VocabParallelEmbedding(50, 64, tp)
        Shard(embed.embedding.weight, table.shape, 0, embed.start, embed.rows).copy_(table)
        with torch.no_grad():
            checks["embedding"] = (embed(ids) - table[ids]).abs().max().item()
            head = ParallelLMHead(64, 50, tp)
            Shard(head.linear.weight, table.shape, 0, embed.start, embed.rows).copy_(table)
            h = torch.randn(4, 64, generator=gen)
            logits = head(h)
        checks["lm_head"] = (logits - h @ table.T).abs().max().item() if rank == 0 else float(logits is None) - 1
        results.put((rank, checks))
    except BaseException:   # noqa: BLE001  (the test reports the rank's traceback)
        results.put((rank, traceback.format_exc()))


def run_ranks(target, world_size: int) -> dict:
    """target(rank, world_size, port, results) in world_size spawned processes, over a store this
    process hosts; returns {rank: what it put}."""
    from cycle11_tp.parallel_state import connect_store

    store, port = connect_store("127.0.0.1", 0, world_size, host_store=True)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world_size, port, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=JOIN_TIMEOUT_S) for _ in procs)
    except queue.Empty:
        got = {}
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    del store
    assert len(got) == world_size, f"only ranks {sorted(got)} reported"
    return got


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_each_parallel_layer_equals_its_dense_version(world_size):
    for rank, checks in run_ranks(_layers_on_rank, world_size).items():
        assert isinstance(checks, dict), checks          # a traceback from the rank
        assert checks["int8_scales"] == 0, (rank, checks)   # the very int8 values of the dense layer
        for name, error in checks.items():
            assert error <= 1e-4, (rank, name, checks)


# --- the engine --------------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
           "1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3,"]


def greedy(n: int = 16, logprobs: int | None = None, prompt_logprobs: int | None = None):
    return cycle(TP).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs)


def assert_logprobs_close(out, ref, field: str) -> None:
    """The sums run in another order over the ranks: the same tokens, values equal to rounding."""
    for a, b in zip(out, ref):
        for x, y in zip(getattr(a, field), getattr(b, field)):
            assert (x is None) == (y is None)
            if x is not None:
                assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-3 for t in x)


@pytest.mark.parametrize("arch, quantization", [("qwen3", None), ("llama", "int8")])
def test_tiny_model_at_tp_2_and_3_gives_tp_1s_tokens(tiny_tp, arch, quantization):
    prompts = [[5, 9, 13, 70, 22, 8, 3, 40], [40, 41, 42], list(range(100, 137))]
    opts = dict(device="cpu", quantization=quantization, int8_matmul="cast" if quantization else None,
                max_num_batched_tokens=16)      # chunked prefill: the 37-token prompt in three steps
    one = cycle(TP).LLM(tiny_tp[arch], **opts)
    ref = one.generate(prompts, greedy(logprobs=2))
    ref_prompt = one.generate(prompts[:2], greedy(4, prompt_logprobs=2))   # logits of every prompt row
    for n in (2, 3):
        llm = cycle(TP).LLM(tiny_tp[arch], tensor_parallel_size=n, **opts)
        try:
            out = llm.generate(prompts, greedy(logprobs=2))
            out_prompt = llm.generate(prompts[:2], greedy(4, prompt_logprobs=2))
            stats = llm.model_runner.stats()
        finally:
            llm.shutdown()
        assert [o.token_ids for o in out] == [o.token_ids for o in ref], n
        assert_logprobs_close(out, ref, "logprobs")
        assert_logprobs_close(out_prompt, ref_prompt, "prompt_logprobs")
        assert stats["tensor_parallel_size"] == n and stats["tp_all_reduce_calls"] > 0


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_same_or_near_tie(out, ref, tolerance: float = 1e-3) -> None:
    """Greedy tokens equal; where the all-reduce's other order of summation flipped a near-tie, the
    reference's top two logprobs at the first differing position are within `tolerance`."""
    for a, b in zip(out, ref):
        i = first_difference(a.token_ids, b.token_ids)
        if i is None:
            continue
        top = sorted(b.logprobs[i].values(), reverse=True)
        assert top[0] - top[1] < tolerance, f"tokens differ at {i} without a near-tie: {b.logprobs[i]}"


def test_smollm2_tp_3_gives_tp_1s_tokens_with_every_feature_on():
    """Real SmolLM2 in fp32 (9 heads, 3 KV heads: tp=3), prefix caching, chunked prefill (a budget of
    32 tokens), n-gram speculation: tp=3's greedy tokens are tp=1's."""
    opts = dict(device="cpu", quantization=None, enable_prefix_caching=True, max_num_batched_tokens=32,
                speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    system = "You are a careful assistant. Answer in one short sentence, plainly, without any preamble. " * 2
    prompts = PROMPTS + [system + "What is the capital of France?", system + "Name a prime number."]
    one = cycle(TP).LLM(SMOLLM2, **opts)
    ref = one.generate(prompts, greedy(24))
    llm = cycle(TP).LLM(SMOLLM2, tensor_parallel_size=3, **opts)
    try:
        out = llm.generate(prompts, greedy(24))
        load = llm.load()
    finally:
        llm.shutdown()
    assert load["spec_decode_num_accepted_tokens"] > 0 and load["prefix_cache_hit_tokens"] > 0   # both really ran
    if [o.token_ids for o in out] != [o.token_ids for o in ref]:
        # a request asking for logprobs is not speculated (cycle 10), and its greedy tokens are the same
        assert_same_or_near_tie(out, one.generate(prompts, greedy(24, logprobs=2)))


def test_tp_1_is_cycle_10():
    opts = dict(device="cpu", quantization=None)
    ours = cycle(TP).LLM(SMOLLM2, **opts).generate(PROMPTS, greedy(24))
    theirs = cycle("cycle10_speculative").LLM(SMOLLM2, **opts).generate(
        PROMPTS, cycle("cycle10_speculative").SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]


def test_weights_and_kv_heads_split_per_rank(tiny_tp):
    one = cycle(TP).LLM(tiny_tp["qwen3"], device="cpu", quantization=None, num_kv_blocks=64)
    three = cycle(TP).LLM(tiny_tp["qwen3"], device="cpu", quantization=None, num_kv_blocks=64, tensor_parallel_size=3)
    try:
        s1, s3 = one.model_runner.stats(), three.model_runner.stats()
        attn = three.model_runner.model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 2)
        # the KV pool: a third of the bytes for the same blocks (two of six KV heads per rank)
        assert s3["kv_cache_pool_bytes"] * 3 == s1["kv_cache_pool_bytes"]
        # the weights: a third, plus what every rank keeps whole (norms) and the vocabulary's padding
        assert s1["weight_bytes"] / 3 < s3["weight_bytes"] < s1["weight_bytes"] / 3 * 1.05
    finally:
        three.shutdown()


def test_all_reduce_bytes_per_token_are_the_formula(tiny_tp):
    """Two all-reduces of [tokens, hidden] per layer (after o_proj and down_proj) and one for the
    vocab-split embedding: (2 * layers + 1) * hidden * dtype bytes per token computed."""
    llm = cycle(TP).LLM(tiny_tp["llama"], device="cpu", quantization=None, tensor_parallel_size=2,
                        enable_prefix_caching=False)
    try:
        tp = llm.model_runner.tp
        llm.generate([[1, 2, 3]], greedy(2))
        out = llm.generate([[5, 6, 7, 8, 9]], greedy(4))   # generate() counts its own run only
        computed = 5 + len(out[0].token_ids) - 1      # the prompt, then one token per decode step
        config = llm.model_runner.model.config
        assert tp.all_reduce_bytes == computed * (2 * config.num_hidden_layers + 1) * config.hidden_size * 4
    finally:
        llm.shutdown()


def test_heads_that_do_not_divide_are_refused_before_loading(monkeypatch):
    """SmolLM2 has 9 heads and 3 KV heads: tp=2 is refused with the sizes that work, before any
    worker starts or any weight loads."""
    tp = cycle(TP)
    monkeypatch.setattr(tp.llm, "Executor", lambda *a: pytest.fail("a worker started"))
    monkeypatch.setattr(tp.llm, "ModelRunner", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match=r"num_attention_heads \(9\).*\[1, 3\]"):
        tp.LLM(SMOLLM2, device="cpu", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        tp.LLM(SMOLLM2, device="cpu", tensor_parallel_size=0)
    # started by torchrun with 3 processes, without --tensor-parallel-size 3: refused, not a hang
    for key, value in dict(TORCHELASTIC_RUN_ID="x", RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="torchrun started 3 processes.*--tensor-parallel-size 3"):
        tp.LLM(SMOLLM2, device="cpu")


def test_two_torchrun_node_groups_give_one_processs_tokens():
    """Two torchrun node groups on the loopback address (--nnodes 2): node 0 runs rank 0, the engine;
    node 1 runs ranks 1 and 2, which serve its steps. SmolLM2 in fp32 at tp=3 gives the text one
    process gives at tp=1."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    port = free_port()
    args = ["-m", f"{TP}.run", "hello", "--model", SMOLLM2, "--device", "cpu", "--temperature", "0",
            "--max-tokens", "12", "--ignore-eos", "--option", "quantization=None"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    node = lambda rank, nproc: [torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", str(nproc),
                                "--master-addr", "127.0.0.1", "--master-port", str(port), *args,
                                "--tensor-parallel-size", "3"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    workers = subprocess.Popen(node(1, 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        engine = subprocess.run(node(0, 1), capture_output=True, text=True, timeout=JOIN_TIMEOUT_S, env=env)
        _, workers_err = workers.communicate(timeout=JOIN_TIMEOUT_S)
    finally:
        if workers.poll() is None:
            workers.kill()
            workers.wait()
    assert engine.returncode == 0 and workers.returncode == 0, engine.stderr[-2000:] + workers_err[-2000:]
    assert _generated(engine.stdout) == _generated(single.stdout) != ""


def _generated(stdout: str) -> str:
    """The generated text of the run CLI's output (its --- header, the text, then the [..] line)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("--- "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("["))
    return "\n".join(lines[start + 1:end])


@pytest.mark.cuda
def test_qwen3_tp_2_on_two_gpus_gives_tp_1s_tokens():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (the lent machine has one)")
    prompts = PROMPTS
    ref = cycle(TP).LLM("Qwen/Qwen3-0.6B").generate(prompts, greedy(32, logprobs=2))
    llm = cycle(TP).LLM("Qwen/Qwen3-0.6B", tensor_parallel_size=2)
    try:
        out = llm.generate(prompts, greedy(32, logprobs=2))
    finally:
        llm.shutdown()
    assert_same_or_near_tie(out, ref, tolerance=0.05)   # bf16: a coarser near-tie
