"""How the paged cycles size their KV pool (kv_cache.py, identical in cycles 3-7), as vLLM does."""

import importlib

import pytest
import torch

from conftest import CYCLES, cycle

PAGED = [c for c in CYCLES if c not in ("cycle1_naive", "cycle2_kvcache")]


def block_manager(llm):
    """Cycle 3's LLM holds its BlockManager; from cycle 4 on the Scheduler owns it."""
    return llm.scheduler.block_manager if hasattr(llm, "scheduler") else llm.block_manager


kv = importlib.import_module("cycle4_batching.kv_cache")
GiB = 1 << 30


def fake_gpu(monkeypatch, free: int, total: int, allocated: int):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_cuda_budget_is_utilization_of_total_less_model_and_activation_peak(monkeypatch):
    fake_gpu(monkeypatch, free=70 * GiB, total=80 * GiB, allocated=2 * GiB)
    plan = kv.plan_kv_pool(1 << 20, torch.device("cuda"), max_blocks=10**9, num_kv_blocks=None,
                           kv_cache_memory_bytes=None, gpu_memory_utilization=0.5, profile=lambda: 3 * GiB)
    assert plan["budget_bytes"] == 40 * GiB - 2 * GiB - 3 * GiB
    assert plan["num_kv_blocks"] == 35 * 1024
    assert (plan["model_bytes"], plan["activation_peak_bytes"], plan["total_memory_bytes"]) == (2 * GiB, 3 * GiB, 80 * GiB)
    assert plan["sized_by"] == "gpu_memory_utilization"


def test_cuda_budget_never_exceeds_free_memory(monkeypatch):
    fake_gpu(monkeypatch, free=10 * GiB, total=80 * GiB, allocated=2 * GiB)   # another process holds the rest
    plan = kv.plan_kv_pool(1 << 20, torch.device("cuda"), 10**9, None, None, 0.9, profile=lambda: 1 * GiB)
    assert plan["budget_bytes"] == 9 * GiB


def test_pool_is_capped_at_what_max_num_seqs_times_max_model_len_can_use(monkeypatch):
    fake_gpu(monkeypatch, free=80 * GiB, total=80 * GiB, allocated=0)
    plan = kv.plan_kv_pool(1 << 10, torch.device("cuda"), 128, None, None, 0.9, profile=lambda: 0)
    assert plan["num_kv_blocks"] == 128 and "capped" in plan["sized_by"]
    cpu = kv.plan_kv_pool(1 << 10, torch.device("cpu"), 128, None, None, 0.9, profile=lambda: 1 / 0)
    assert cpu["num_kv_blocks"] == 128 and cpu["activation_peak_bytes"] is None   # no profiling on CPU
    uncapped = kv.plan_kv_pool(1 << 20, torch.device("cpu"), 10**9, None, None, 0.9, profile=lambda: 1 / 0)
    assert uncapped["num_kv_blocks"] == kv.CPU_KV_CACHE_BYTES >> 20


def test_overrides_and_a_budget_without_one_block(monkeypatch):
    fake_gpu(monkeypatch, free=8 * GiB, total=8 * GiB, allocated=7 * GiB)
    cuda = torch.device("cuda")
    assert kv.plan_kv_pool(1 << 20, cuda, 4, 1000, None, 0.9, profile=lambda: 1 / 0)["num_kv_blocks"] == 1000
    assert kv.plan_kv_pool(1 << 20, cuda, 10**9, None, 5 << 20, 0.9, profile=lambda: 1 / 0)["num_kv_blocks"] == 5
    with pytest.raises(ValueError, match="activation peak 1073741824 bytes.*not even one block"):
        kv.plan_kv_pool(1 << 20, cuda, 10**9, None, None, 0.9, profile=lambda: GiB)   # 7.2 - 7 - 1 < 0


def test_profile_batches_are_the_largest_steps():
    assert kv.profile_batches(256, 16384, 40960) == [([16384], True), ([64] * 256, False)]
    # a budget longer than the model allows: several sequences of the longest allowed length
    assert kv.profile_batches(64, 4096, 512) == [([512] * 8, True), ([64] * 64, False)]
    assert kv.profile_batches(4, 100, 8) == [([8] * 4, True), ([8] * 4, False)]


@pytest.mark.parametrize("name", PAGED)
def test_bad_pool_options_are_refused_before_loading(name):
    for option in (dict(gpu_memory_utilization=0), dict(gpu_memory_utilization=1.5),
                   dict(num_kv_blocks=0), dict(kv_cache_memory_bytes=-1)):
        with pytest.raises(ValueError, match=next(iter(option))):
            cycle(name).LLM("no/such-model-is-ever-loaded", device="cpu", **option)


@pytest.mark.parametrize("name", PAGED)
def test_tiny_model_pool_is_capped_and_recorded(name, tiny_llms):
    llm = tiny_llms(name, max_num_seqs=4)
    # tiny config: max_position_embeddings 512 = 32 blocks of 16; 4 sequences at most
    assert block_manager(llm).num_blocks == 4 * 32
    llm.generate([[5, 6, 7]], cycle(name).SamplingParams(temperature=0, max_tokens=2))
    pool = llm.stats["kv_pool"]
    assert pool["num_kv_blocks"] == 128 and pool["cap_blocks"] == 128
    assert pool["budget_bytes"] == kv.CPU_KV_CACHE_BYTES and "capped" in pool["sized_by"]


@pytest.mark.parametrize("name", PAGED)
def test_profile_run_touches_no_real_kv_slot_and_leaves_no_state(name, tiny_llms):
    llm = tiny_llms(name, max_num_seqs=4)
    prompts = [[5, 17, 42, 9, 33], list(range(10, 41))]
    params = cycle(name).SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = [o.token_ids for o in llm.generate(prompts, params)]
    pool = [t.clone() for t in llm.model_runner.kv_cache.k + llm.model_runner.kv_cache.v]
    manager = block_manager(llm)
    free = manager.num_free_blocks
    llm.model_runner._profile_run()     # what CUDA runs before the pool exists
    assert all(torch.equal(a, b) for a, b in zip(pool, llm.model_runner.kv_cache.k + llm.model_runner.kv_cache.v))
    assert block_manager(llm) is manager and manager.num_free_blocks == free
    assert [o.token_ids for o in llm.generate(prompts, params)] == before


@pytest.mark.cuda
@pytest.mark.parametrize("name", PAGED)
def test_cuda_pool_is_profiled_and_the_profile_covers_a_full_step(name, tiny_checkpoints):
    llm = cycle(name).LLM(tiny_checkpoints["qwen3"][0], device="cuda", max_num_seqs=4,
                          **({} if name == "cycle3_paged" else {"max_num_batched_tokens": 512}))
    pool = llm.model_runner.kv_pool
    assert pool["sized_by"].startswith("gpu_memory_utilization") and pool["activation_peak_bytes"] > 0
    assert pool["num_kv_blocks"] == pool["cap_blocks"]             # a tiny model: capped, not millions
    prompt = list(range(3, 503))                                   # one prefill of ~the profiled size
    llm.generate([prompt], cycle(name).SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    used = llm.stats["peak_memory_bytes"] - pool["model_bytes"] - llm.model_runner.kv_cache.nbytes
    assert used <= pool["activation_peak_bytes"] * 1.1 + (1 << 20)
