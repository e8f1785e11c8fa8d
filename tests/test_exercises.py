"""The answers to the exercises of docs/CYCLE_GUIDE.md, one test (or a few) per exercise.

Run one with `pytest tests/test_exercises.py -k NAME`, NAME as the guide gives it. Every test is
fast: pure functions, tiny random checkpoints (tests/conftest.py) or models on the meta device; no
download, no SmolLM2 weights. Each asserts the number the guide asks the reader to work out, so a
wrong answer in the guide, or a change in the engine that changes the answer, fails here.
"""

import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import cycle

ROOT = Path(__file__).resolve().parents[1]

# SmolLM2-135M-Instruct's shape (its config.json), written out so no test needs its weights.
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)


def qwen3_0_6b() -> dict:
    return json.loads((ROOT / "common/configs/Qwen3-0.6B/config.json").read_text())


def greedy(name, n):
    return cycle(name).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def count_fed_tokens(llm) -> list[int]:
    """Wrap the engine's model forward; the returned list gets the number of token ids of each call."""
    fed = []
    model = llm.model_runner.model
    forward = type(model).forward.__get__(model)     # the class's forward: wraps never stack

    def counting(input_ids, *args, **kwargs):
        fed.append(input_ids.numel())
        return forward(input_ids, *args, **kwargs)

    model.forward = counting
    return fed


def new_seq(name, seq_id, tokens, max_tokens=4):
    Sequence = importlib.import_module(f"{name}.sequence").Sequence
    return Sequence(seq_id, None, list(tokens), cycle(name).SamplingParams(max_tokens=max_tokens), None)


def block_manager(name, num_blocks, block_size):
    return importlib.import_module(f"{name}.block_manager").BlockManager(num_blocks, block_size)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run on one thread


# --- chapter 1: naive -------------------------------------------------------------------------

@pytest.mark.parametrize("p, n", [(5, 1), (5, 8), (12, 12)])
def test_naive_token_forwards(tiny_llms, p, n):
    """Cycle 1 feeds p + i tokens at step i: sum_{i=0}^{n-1} (p + i) = n*p + n*(n-1)/2 in all."""
    llm = tiny_llms("cycle1_naive")
    fed = count_fed_tokens(llm)
    llm.generate([list(range(10, 10 + p))], greedy("cycle1_naive", n))
    assert fed == [p + i for i in range(n)]
    assert sum(fed) == n * p + n * (n - 1) // 2


def test_naive_static_batch(tiny_llms):
    """Prompts of 3 and 7 tokens, max_tokens 2 and 5, one static batch: two steps feed both rows,
    left-padded to the longer one (14, 16); then the short one has finished and leaves: 9, 10, 11."""
    llm = tiny_llms("cycle1_naive")
    fed = count_fed_tokens(llm)
    llm.generate([[10, 11, 12], list(range(20, 27))], [greedy("cycle1_naive", 2), greedy("cycle1_naive", 5)])
    assert fed == [14, 16, 9, 10, 11] and sum(fed) == 60


# --- chapter 2: KV cache ----------------------------------------------------------------------

def test_kv_bytes(tiny_llms):
    """The engine's own byte counts: a real cycle 3 engine's pool (the tiny model: 2 layers, 2 KV
    heads, head_dim 32, fp32) holds 2 x 2 x 2 x 32 x 4 = 1,024 bytes per token and per slot, and
    block_bytes, the function that sizes every pool, gives the guide's 46,080 and 114,688."""
    llm = tiny_llms("cycle3_paged")
    pool, config = llm.model_runner.kv_cache, llm.source.config
    per_token = pool.bytes_per_block // llm.block_manager.block_size
    assert per_token == 1024 == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    assert pool.k[0].numel() * pool.k[0].element_size() * 2 * len(pool.k) == pool.bytes_per_block * llm.block_manager.num_blocks
    block_bytes = importlib.import_module("cycle3_paged.kv_cache").block_bytes
    s, c = SMOLLM2_SHAPE, qwen3_0_6b()
    assert block_bytes(s["num_hidden_layers"], 1, s["num_key_value_heads"], s["head_dim"], torch.float32) == 46_080
    assert block_bytes(c["num_hidden_layers"], 1, c["num_key_value_heads"], c["head_dim"], torch.bfloat16) == 114_688
    # A block of 16 tokens, and what the CPU pool of 512 MiB holds: the engine's own plan for
    # SmolLM2 (64 sequences of 8192 positions at most, so the cap is far above the budget).
    assert block_bytes(30, 16, 3, 64, torch.float32) == 737_280
    kv = importlib.import_module("cycle3_paged.kv_cache")
    plan = kv.plan_kv_pool(737_280, torch.device("cpu"), 64 * 8192 // 16, None, None, 0.9, profile=None)
    assert (plan["num_kv_blocks"], plan["num_kv_blocks"] * 16) == (728, 11_648)
    # flash_attn's 256-token block for Qwen3-0.6B in bf16: 28 MiB.
    assert block_bytes(28, 256, 8, 128, torch.bfloat16) == 28 * 2**20


def test_kv_forwards(tiny_llms):
    """Cycle 2 feeds the prompt once, then one token per step: p + (n - 1) tokens in all."""
    llm = tiny_llms("cycle2_kvcache")
    fed = count_fed_tokens(llm)
    llm.generate([list(range(10, 22))], greedy("cycle2_kvcache", 20))
    assert fed == [12] + [1] * 19 and sum(fed) == 12 + 19


def test_kv_reservation(tiny_llms):
    """Prompts of 3 and 7 tokens, max_tokens 2 and 5: cycle 2 reserves 2 rows x (7 + 5) columns;
    the tiny model stores 2 x 2 layers x 2 KV heads x 32 x 4 bytes = 1024 bytes per column."""
    llm = tiny_llms("cycle2_kvcache")
    fed = count_fed_tokens(llm)
    llm.generate([[10, 11, 12], list(range(20, 27))], [greedy("cycle2_kvcache", 2), greedy("cycle2_kvcache", 5)])
    config = llm.source.config
    per_column = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4   # 1,024
    assert llm.stats["kv_cache_peak_bytes"] == 2 * (7 + 5) * per_column == 24_576
    assert fed == [14, 2, 1, 1, 1]                 # the finished row leaves; its columns stay reserved
    # Tokens whose K/V an output needs (prompt + max_tokens - 1, as the paged cycles count them): 15 of 24
    needed = [new_seq("cycle3_paged", i, range(n), max_tokens=m).max_len for i, (n, m) in enumerate([(3, 2), (7, 5)])]
    assert needed == [4, 11] and sum(needed) == 15


# --- chapter 3: paged -------------------------------------------------------------------------

@pytest.mark.parametrize("position, slot", [(0, 112), (15, 127), (16, 32), (37, 149), (47, 159)])
def test_slot(position, slot):
    """block_table [7, 2, 9], block_size 16: slot = block_table[pos // 16] * 16 + pos % 16."""
    bm = block_manager("cycle3_paged", 10, 16)
    seq = new_seq("cycle3_paged", 0, [1] * 48)
    seq.block_table = [7, 2, 9]
    assert bm.slot(seq, position) == slot


def test_blocks_held(tiny_llms):
    """A sequence holds ceil(k / block_size) blocks after k tokens; at 33 tokens of block_size 16:
    3 blocks, 48 slots, utilization 33 / 48."""
    bm = block_manager("cycle3_paged", 100, 16)
    seq = new_seq("cycle3_paged", 0, [1] * 20)
    bm.allocate(seq)
    held = {}
    for k in range(21, 66):
        seq.token_ids.append(1)
        bm.append_slot(seq)
        held[k] = len(seq.block_table)
        assert held[k] == math.ceil(k / 16)
    assert (held[32], held[33], held[48], held[49], held[65]) == (2, 3, 3, 4, 5)
    # The engine's own figure: a 20-token prompt and 14 new tokens store at most 33 tokens' K/V.
    llm = tiny_llms("cycle3_paged")
    llm.generate([list(range(10, 30))], greedy("cycle3_paged", 14))
    assert llm.stats["kv_cache_peak_bytes"] == 3 * llm.model_runner.kv_cache.bytes_per_block
    assert llm.stats["kv_block_utilization"] == 0.6875


def test_static_groups():
    """Cycle 3 admits a static group by its worst case: 5 requests of a 6-token prompt with
    max_tokens 6 can store 6 + 6 - 1 = 11 tokens = 3 blocks of 4; a pool of 8 blocks takes 2."""
    bm = block_manager("cycle3_paged", 8, 4)
    seqs = [new_seq("cycle3_paged", i, [1] * 6, max_tokens=6) for i in range(5)]
    assert [s.max_len for s in seqs] == [11] * 5 and bm.blocks_for(11) == 3
    fake_llm = SimpleNamespace(block_manager=bm, config=SimpleNamespace(max_num_seqs=32))
    groups = list(cycle("cycle3_paged").LLM._groups(fake_llm, seqs))
    assert [len(g) for g in groups] == [2, 2, 1]


# --- chapter 4: continuous batching -----------------------------------------------------------

def test_continuous_steps(tiny_llms):
    """max_num_seqs=2, three requests with max_tokens 2, 8, 3: static batching (cycle 3) runs
    groups [0, 1] and [2] for 8 + 3 = 11 forwards; continuous batching (cycle 4) needs 9 steps."""
    prompts = [[9, 10, 11]] * 3
    static = tiny_llms("cycle3_paged", max_num_seqs=2)
    static.generate(prompts, [greedy("cycle3_paged", n) for n in (2, 8, 3)])
    assert len(static.stats["step_times"]) == 11          # one entry per model forward
    continuous = tiny_llms("cycle4_batching", max_num_seqs=2)
    continuous.generate(prompts, [greedy("cycle4_batching", n) for n in (2, 8, 3)])
    assert continuous.stats["steps"] == 9


def test_flat_batch():
    """Prompts of 3, 5 and 2 tokens, block_size 4, a fresh pool: one flat prefill of 10 tokens."""
    ModelRunner = importlib.import_module("cycle4_batching.model_runner").ModelRunner
    bm = block_manager("cycle4_batching", 16, 4)
    seqs = [new_seq("cycle4_batching", i, range(100, 100 + n)) for i, n in enumerate((3, 5, 2))]
    for seq in seqs:
        bm.allocate(seq)
    assert [s.block_table for s in seqs] == [[0], [1, 2], [3]]
    runner = object.__new__(ModelRunner)              # no model: only what the step layout reads
    runner.device, runner.block_size = torch.device("cpu"), bm.block_size
    input_ids, positions, meta = runner._prepare(seqs, is_prefill=True)
    assert input_ids.shape == (10,)
    assert meta.cu_seqlens_q.tolist() == [0, 3, 8, 10]
    assert positions.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]
    assert meta.slot_mapping.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12, 13]
    for seq in seqs:                                   # each sampled one token: a decode step
        seq.token_ids.append(7)
        bm.append_slot(seq)
    input_ids, positions, meta = runner._prepare(seqs, is_prefill=False)
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3]
    assert positions.tolist() == [3, 5, 2]
    assert meta.slot_mapping.tolist() == [3, 9, 14]


# --- chapter 5: prefix caching ----------------------------------------------------------------

def prefix_hit_tokens(shared, len_a, len_b, block_size):
    """Tokens of B served from the cache after A's prompt was computed (B: len_b tokens, the first
    `shared` equal to A's). Only full blocks before B's last token are looked up, only blocks A
    filled are cached, and only blocks whose tokens all match can hit."""
    blocks = min(shared // block_size, (len_b - 1) // block_size, len_a // block_size)
    return blocks * block_size


@pytest.mark.parametrize("shared, len_a, len_b, block_size, expected", [
    (10, 12, 15, 4, 8),      # 2 full shared blocks
    (16, 16, 16, 4, 12),     # identical prompts: the last block holds the last token, computed again
    (20, 20, 30, 8, 16),
    (5, 12, 12, 8, 0),       # shorter than a block: nothing to share
    (40, 40, 41, 16, 32),
])
def test_prefix_hits(shared, len_a, len_b, block_size, expected):
    assert prefix_hit_tokens(shared, len_a, len_b, block_size) == expected
    bm = block_manager("cycle5_prefix", 32, block_size)
    a_tokens = list(range(1000, 1000 + len_a))
    b_tokens = a_tokens[:shared] + list(range(5000, 5000 + len_b - shared))
    a, b = new_seq("cycle5_prefix", 0, a_tokens), new_seq("cycle5_prefix", 1, b_tokens)
    for seq in (a, b):                           # as the scheduler admits, then the engine caches
        hashes = bm.prompt_block_hashes(seq)
        bm.allocate(seq, bm.cached_blocks(seq, hashes), hashes)
        bm.cache_full_blocks(seq, num_computed_tokens=len(seq))
    assert b.num_cached_tokens == expected
    assert b.block_table[:expected // block_size] == a.block_table[:expected // block_size]


def test_ref_counts():
    """A: 12 tokens (3 full blocks of 4); B: A's first 8 tokens + 3 of its own."""
    bm = block_manager("cycle5_prefix", 8, 4)
    a = new_seq("cycle5_prefix", 0, range(100, 112))
    b = new_seq("cycle5_prefix", 1, list(range(100, 108)) + [7, 7, 7])
    for seq in (a, b):
        hashes = bm.prompt_block_hashes(seq)
        bm.allocate(seq, bm.cached_blocks(seq, hashes), hashes)
        bm.cache_full_blocks(seq, num_computed_tokens=len(seq))
    assert a.block_table == [0, 1, 2] and b.block_table == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    bm.free(a)                                    # A finishes
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert 2 in bm.free_block_ids and bm.num_free_blocks == 5
    # Block 2 is free but still cached: a request with A's 12 tokens and one more hits all three.
    c = new_seq("cycle5_prefix", 2, list(range(100, 112)) + [9])
    hashes = bm.prompt_block_hashes(c)
    assert bm.cached_blocks(c, hashes) == [0, 1, 2]


def test_prefix_wait():
    """Two identical 12-token prompts, block_size 4, queued together: the second waits one step
    for the first's blocks, then computes only its last block (8 tokens cached)."""
    Config = importlib.import_module("cycle5_prefix.config").Config
    config = Config("no/model-loaded", device="cpu", block_size=4, max_num_seqs=8, max_num_batched_tokens=4096)
    OutputProcessor = importlib.import_module("cycle5_prefix.output_processor").OutputProcessor
    scheduler = importlib.import_module("cycle5_prefix.scheduler").Scheduler(config, 16, OutputProcessor(None, set()))
    bm = scheduler.block_manager
    a, b = new_seq("cycle5_prefix", 0, range(100, 112)), new_seq("cycle5_prefix", 1, range(100, 112))
    scheduler.add([a, b], detokenize=False)
    seqs, is_prefill = scheduler.schedule()                  # step 1
    assert is_prefill and seqs == [a] and list(scheduler.waiting) == [b]
    bm.cache_full_blocks(a, num_computed_tokens=len(a))     # what the engine does after the step
    a.token_ids.append(7)
    seqs, is_prefill = scheduler.schedule()                  # step 2: B is admitted, and hits
    assert is_prefill and seqs == [b]
    assert b.num_cached_tokens == 8 and len(b) - b.num_cached_tokens == 4


# --- chapter 6: fused attention ---------------------------------------------------------------

@pytest.mark.parametrize("num_keys", [1, 3, 64, 65, 200])
def test_online_softmax(num_keys):
    """Cycle 6's own Triton decode kernel (run by Triton's interpreter on a CPU) walks the keys in
    tiles of BLOCK_N with a running max, sum and output: for one query over 1 to 200 paged keys
    (up to 4 tiles, blocks scattered in the pool), whose largest score sits in the last tile and
    is far above 88 (where exp of an unshifted score overflows fp32), it equals the softmax over
    all keys at once, in float64. A wrong rescaling (exp(m - m_new)) fails here."""
    kernels = importlib.import_module("cycle6_flash.triton_attention")
    gen = torch.Generator().manual_seed(num_keys)
    block_size, num_blocks, D = 16, 16, 16
    direction = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    q = (direction * 10 + 0.1 * torch.randn(1, 2, D, generator=gen))    # 2 query heads, 1 KV head
    # Keys along the query's direction, growing with their position: later tiles raise the max.
    growth = torch.linspace(0.5, 1.0, num_keys).unsqueeze(1)
    keys = (direction * 12 + 0.01 * torch.randn(num_keys, D, generator=gen)) * growth
    values = torch.randn(num_keys, D, generator=gen)
    k_cache, v_cache = torch.zeros(num_blocks, block_size, 1, D), torch.zeros(num_blocks, block_size, 1, D)
    table = list(range(num_blocks - 1, num_blocks - 1 - -(-num_keys // block_size), -1))   # reverse order
    for i in range(num_keys):
        k_cache[table[i // block_size], i % block_size, 0] = keys[i]
        v_cache[table[i // block_size], i % block_size, 0] = values[i]
    out = kernels.paged_decode_attention(q, k_cache, v_cache, torch.tensor([table], dtype=torch.int32),
                                         torch.tensor([num_keys], dtype=torch.int32), 1.0)
    scores = q[0].double() @ keys.double().T                              # [heads, keys]
    if num_keys > 1:
        assert scores.max(dim=1).values.gt(88).all()
        assert scores.argmax(dim=1).ge((num_keys - 1) // 64 * 64).all()    # the max is in the last tile
    assert kernels.tile_sizes(q)[1] == 64                                 # 200 keys: 4 tiles
    torch.testing.assert_close(out[0].double(), torch.softmax(scores, dim=-1) @ values.double(),
                               atol=1e-5, rtol=1e-5)


def test_score_bytes(monkeypatch):
    """The explicit attention (cycles 1-5) hands softmax an fp32 tensor of heads x queries x keys
    per sequence, whatever the model dtype."""
    model = importlib.import_module("cycle5_prefix.model")
    seen = []
    softmax = torch.softmax

    def recording(x, *args, **kwargs):
        seen.append(x)
        return softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording)
    B, H, KVH, Tq, Tk, D = 2, 8, 2, 5, 24, 16
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, H, Tq, D, dtype=dtype)
        k, v = torch.randn(B, KVH, Tk, D, dtype=dtype), torch.randn(B, KVH, Tk, D, dtype=dtype)
        model.grouped_attention(q, k, v, torch.ones(B, Tq, Tk, dtype=torch.bool), 0.25)
        scores = seen[-1]
        assert scores.dtype == torch.float32
        assert scores.numel() * scores.element_size() == B * H * Tq * Tk * 4
    # Qwen3-0.6B, one 4096-token prefill, in bf16: 1 GiB, in every layer (on the meta device: no memory)
    c = qwen3_0_6b()
    H, KVH, D, T = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], 4096
    with torch.device("meta"):
        q = torch.empty(1, H, T, D, dtype=torch.bfloat16)
        k = v = torch.empty(1, KVH, T, D, dtype=torch.bfloat16)
        model.grouped_attention(q, k, v, torch.ones(1, T, T, dtype=torch.bool), 0.25)
    assert seen[-1].numel() * seen[-1].element_size() == 2**30


def test_masked_nan():
    """A masked key gets probability 0, but 0 * NaN = NaN: the pool is zeroed for that reason."""
    model = importlib.import_module("cycle5_prefix.model")
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 4, generator=gen), torch.randn(1, 1, 3, 4, generator=gen)
    mask = torch.tensor([[[True, True, False]]])           # the third key is masked out
    zeros = torch.randn(1, 1, 3, 4, generator=gen)
    zeros[0, 0, 2] = 0.0
    assert torch.isfinite(model.grouped_attention(q, k, zeros, mask, 0.5)).all()
    nan = zeros.clone()
    nan[0, 0, 2] = float("nan")
    assert torch.isnan(model.grouped_attention(q, k, nan, mask, 0.5)).all()
    pool = importlib.import_module("cycle6_flash.kv_cache").PagedKVCache(1, 4, 16, 2, 8, torch.float32, torch.device("cpu"))
    assert all((t == 0).all() for t in pool.k + pool.v)


BACKEND_CASES = [   # device, dtype, flash-attn importable, asked for -> backend (block size) or error
    ("cpu", torch.float32, False, None, "sdpa"),
    ("cpu", torch.float32, False, "triton", "triton"),
    ("cpu", torch.float32, False, "flash_attn", "CUDA only"),
    ("cpu", torch.bfloat16, False, "triton", "bf16"),
    ("cuda", torch.bfloat16, True, None, "flash_attn"),
    ("cuda", torch.bfloat16, False, None, "triton (note)"),
    ("cuda", torch.float32, True, None, "triton (note)"),
    ("cuda", torch.bfloat16, True, "sdpa", "sdpa"),
    ("cuda", torch.bfloat16, False, "flash_attn", "does not import"),
]


@pytest.mark.parametrize("device, dtype, has_flash, requested, expected", BACKEND_CASES)
def test_backend(monkeypatch, device, dtype, has_flash, requested, expected):
    """Which backend cycle 6 picks follows its inputs: the device, the dtype, whether flash-attn
    imports, and what was asked for; a fallback nobody asked for carries a note, an impossible
    request is an error; the block size follows the backend. (select_backend reads only the
    device's type, so the CUDA rows run without a GPU.)"""
    import sys
    from types import ModuleType

    attention = importlib.import_module("cycle6_flash.attention")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Only the import of flash_attn is arranged here (a stand-in module, or None: "import fails");
    # every rule (device, dtype, the order, the notes, the errors) is cycle 6's own select_backend.
    fake = ModuleType("flash_attn")
    fake.flash_attn_varlen_func = fake.flash_attn_with_kvcache = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", fake if has_flash else None)
    if expected in attention.BACKENDS or expected.endswith("(note)"):
        backend, note = attention.select_backend(torch.device(device), dtype, requested)
        assert backend == expected.split()[0]
        assert (note is not None) == expected.endswith("(note)")
        assert attention.DEFAULT_BLOCK_SIZE[backend] == (256 if backend == "flash_attn" else 16)
        attention.check_block_size(backend, attention.DEFAULT_BLOCK_SIZE[backend])
        if backend == "flash_attn":       # its paged kernels read whole 256-token pages
            with pytest.raises(ValueError, match="multiple of 256"):
                attention.check_block_size(backend, 16)
    else:
        with pytest.raises(ValueError, match=expected):
            attention.select_backend(torch.device(device), dtype, requested)


# --- chapter 7: int8 --------------------------------------------------------------------------

def test_int8_error():
    """Row scale = max|w_row| / 127; every weight comes back within scale / 2."""
    quant = importlib.import_module("cycle7_int8.quantization")
    w = torch.tensor([[0.5, -1.27, 0.004, 1.0], [2.54, 0.0, -0.01, 1.27]])
    q, scale = quant.quantize_absmax(w)
    torch.testing.assert_close(scale, torch.tensor([0.01, 0.02]))
    assert q.tolist() == [[50, -127, 0, 100], [127, 0, -0, 64]]      # 1.27 / 0.02 = 63.5 -> 64
    err = (quant.dequantize(q, scale) - w).abs()
    assert (err <= scale.unsqueeze(1) / 2 + 1e-6).all()
    assert math.isclose(err[1, 3].item(), 0.01, abs_tol=1e-6)          # exactly half a step: the worst case


def count_bytes(model) -> int:
    """Parameters and buffers, a shared tensor counted once (works on the meta device)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_meta(config, dtype):
    CausalLM = importlib.import_module("cycle7_int8.model").CausalLM
    with torch.device("meta"):
        model = CausalLM(config, "sdpa").to(dtype)
    return model


def expected_bytes(c, weight_bytes, scale_bytes, norm_bytes, qk_norm):
    """Every Linear and the embedding: weight_bytes per weight + scale_bytes per output row (int8) or
    0 (float); norms keep the model dtype (norm_bytes). A tied lm_head is the embedding, counted once."""
    hidden, inter, heads, kvh, hd = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], \
        c["num_key_value_heads"], c["head_dim"]
    linears = [(heads * hd, hidden), (kvh * hd, hidden), (kvh * hd, hidden), (hidden, heads * hd),
               (inter, hidden), (inter, hidden), (hidden, inter)]          # (out, in): q k v o gate up down
    per_layer = sum(o * i * weight_bytes + o * scale_bytes for o, i in linears)
    per_layer += (2 * hidden + (2 * hd if qk_norm else 0)) * norm_bytes
    embed = c["vocab_size"] * (hidden * weight_bytes + scale_bytes)
    return c["num_hidden_layers"] * per_layer + embed + hidden * norm_bytes


def test_int8_bytes():
    from transformers import LlamaConfig, Qwen3Config

    quant = importlib.import_module("cycle7_int8.quantization")
    smol = LlamaConfig(**SMOLLM2_SHAPE)
    smol.architectures = ["LlamaForCausalLM"]
    model = build_meta(smol, torch.float32)
    fp32 = count_bytes(model)
    assert fp32 == expected_bytes(SMOLLM2_SHAPE, 4, 0, 4, False) == 538_060_032
    quant.quantize_model(model, "cast")
    assert model.lm_head.qweight is model.model.embed_tokens.qweight       # tied: one int8 copy
    assert count_bytes(model) == expected_bytes(SMOLLM2_SHAPE, 1, 4, 4, False) == 135_439_104

    c = qwen3_0_6b()
    qwen = Qwen3Config(**{k: c[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "tie_word_embeddings", "rms_norm_eps")})
    qwen.architectures = c["architectures"]
    model = build_meta(qwen, torch.bfloat16)
    assert count_bytes(model) == expected_bytes(c, 2, 0, 2, True) == 1_192_099_840
    quant.quantize_model(model, "cast")
    assert count_bytes(model) == expected_bytes(c, 1, 2, 2, True) == 597_107_456


def test_int8_stats(tiny_llms):
    llm = tiny_llms("cycle7_int8")
    llm.generate([[1, 2, 3]], greedy("cycle7_int8", 2))
    quant = importlib.import_module("cycle7_int8.quantization")
    used = {m.matmul for m in llm.model_runner.model.modules() if isinstance(m, quant.Int8Linear)}
    assert used == {quant.matmul_function(llm.stats["int8_matmul"])}   # the path reported is the path run
    forced = tiny_llms("cycle7_int8", int8_matmul="cast")
    forced.generate([[1, 2, 3]], greedy("cycle7_int8", 2))
    assert forced.stats["int8_matmul"] == "cast"
    layers = [m for m in forced.model_runner.model.modules() if isinstance(m, quant.Int8Linear)]
    assert layers and all(m.matmul is quant.cast_matmul for m in layers)
    # What the cast path computes: a real quantize + Int8Linear against the float matmul. Each
    # output is off by at most sum_j |x_j| * scale_row / 2 (each weight within half a step).
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=gen), torch.randn(5, 64, generator=gen)
    q, scale = quant.quantize_absmax(w)
    out = quant.Int8Linear(q, scale, None, "cast")(x)
    torch.testing.assert_close(out, x @ quant.dequantize(q, scale).t(), rtol=1e-5, atol=1e-5)
    bound = x.abs().sum(dim=1, keepdim=True) * scale / 2
    error = (out - x @ w.t()).abs()
    assert (error <= bound + 1e-5).all() and error.max() > 0
    assert llm.stats["quantize_s"] > 0
    model = llm.model_runner.model
    assert model.lm_head.qweight is model.model.embed_tokens.qweight


# --- chapter 8: side by side ------------------------------------------------------------------

def test_suite_summary():
    """8.1: the stored suite's paging row is 0.72x, -28%, better; equal bytes: NO GAIN, more:
    REGRESSED; cycle 8 on a CPU: GPU only, with no change printed (summary.py on the stored run)."""
    summary = importlib.import_module("common.benchmark.summary")
    data = json.loads((ROOT / "docs/results/cpu-course-suite/results.json").read_text())
    parts = {name: [dict(r) for r in part["results"]] for name, part in data["parts"].items()}
    rows = {r["cycle"]: r for r in summary.summarize(parts)}
    paging = rows[3]
    assert (round(paging["ratio"], 2), summary.change_text(paging["change"]), paging["verdict"]) == (0.72, "-28%", "better")
    assert rows[8]["verdict"] == "GPU only" and rows[8]["before"] != rows[8]["after"]
    table = summary.format_summary(list(rows.values()))
    assert [line for line in table.splitlines() if line.startswith("c7 -> c8")][0].split()[-6:] == ["-", "-", "(none", "stated)", "GPU", "only"]
    by_engine = {r["engine"]: r for r in parts["throughput"]}
    for factor, verdict in ((1.0, "NO GAIN"), (1.1, "REGRESSED")):
        by_engine["cycle3_paged"]["kv_cache_peak_bytes"] = by_engine["cycle2_kvcache"]["kv_cache_peak_bytes"] * factor
        row = {r["cycle"]: r for r in summary.summarize(parts)}[3]
        assert row["verdict"] == verdict
        assert f"c2 -> c3 ({verdict})" in summary.format_summary([row])


@pytest.mark.parametrize("name", ["cycle3_paged", "cycle6_flash"])
def test_gather_blocks(name):
    """8.2: 4 blocks of 2 slots, each slot holding its flat index; tables [2, 0] and [3, 3]."""
    module = importlib.import_module(f"{name}.{'model' if name == 'cycle3_paged' else 'attention'}")
    cache = torch.arange(8, dtype=torch.float32).view(4, 2, 1, 1)       # [num_blocks, block_size, KVH, D]
    tables = torch.tensor([[2, 0], [3, 3]])
    out = module.gather_blocks(cache, tables)
    assert out.shape == (2, 1, 4, 1)
    assert out.flatten(1).tolist() == [[4, 5, 0, 1], [6, 7, 6, 7]]
    assert torch.equal(out, cache[tables].flatten(1, 2).transpose(1, 2))


def test_static_batch_peak():
    """8.3: one forward of cycle 1 over 256 x 1,850 tokens of Qwen3-0.6B in bf16: ~152 GiB beyond
    the weights, ~134 GiB of it the attention term (scores, their fp32 copy and probabilities, mask)."""
    memory = importlib.import_module("common.engine.memory")
    peak = memory.static_batch_bytes(SimpleNamespace(**qwen3_0_6b()), 256, 1850, torch.bfloat16)
    assert (round(peak["total"] / 2**30), round(peak["attention"] / 2**30)) == (152, 134)
    assert peak["attention"] > 0.85 * peak["total"]


# --- chapter 9: serving -----------------------------------------------------------------------

def one_token_per_byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token, as the rarest
    characters are in SmolLM2's and Qwen3's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}   # GPT-2's byte map
    tok = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_stream_emoji():
    """'a👋b' is 6 byte tokens; the emoji's 4 bytes show nothing until the last one completes it."""
    from common.engine.detokenizer import IncrementalDetokenizer

    tokenizer = one_token_per_byte_tokenizer()
    ids = tokenizer.encode("a👋b", add_special_tokens=False)
    assert ids == [97, 0xF0, 0x9F, 0x91, 0x8B, 98]
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.update(t, finishing=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert deltas == ["a", "", "", "", "👋", "b"] and detok.text == "a👋b"


def test_stop_holdback():
    """stop=["END"], one character per token, 'abENxyEND': the stream lags len("END") - 1 = 2
    characters behind the text; the stop string and what follows it are never shown."""
    from common.engine.detokenizer import IncrementalDetokenizer
    from conftest import _byte_tokenizer

    tokenizer = _byte_tokenizer()                       # one token per printable character
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:", add_special_tokens=False), ("END",))
    deltas = []
    for token in tokenizer.encode("abENxyEND", add_special_tokens=False):
        deltas.append(detok.update(token))
        if detok.stopped:
            break
    assert deltas == ["", "", "a", "b", "E", "N", "x", "y", ""]
    assert detok.stopped and detok.text == "abENxy"


def test_serving_metrics():
    """Arrival 0 s, tokens at 0.4, 0.5, 0.6, 1.0, 1.1 s: TTFT 0.4, E2EL 1.1, TPOT 0.7 / 4 = 0.175,
    ITLs 0.1, 0.1, 0.4, 0.1; against SLOs of 0.5 s TTFT and 0.15 s TPOT it misses goodput (TPOT)."""
    online = importlib.import_module("common.benchmark.online")
    times = [0.4, 0.5, 0.6, 1.0, 1.1]
    record = online.RequestRecord(0.0, times, finish_s=1.1, num_output_tokens=5)
    m = online.serving_metrics([record], slo_ttft_s=0.5, slo_tpot_s=0.15)
    assert m["ttft_mean_s"] == pytest.approx(0.4) and m["e2el_mean_s"] == pytest.approx(1.1)
    assert m["tpot_mean_s"] == pytest.approx(0.175)
    assert m["itl_p50_s"] == pytest.approx(0.1) and m["itl_p99_s"] > 0.35
    assert m["goodput"] == 0
    assert online.serving_metrics([record], slo_ttft_s=0.5, slo_tpot_s=0.2)["goodput"] == pytest.approx(1 / 1.1)


# --- chapter 10: CUDA graphs (bonus) ---------------------------------------------------------

def graphs_module():
    return importlib.import_module("cycle8_graphs.cuda_graphs")


def test_graph_buckets():
    """max_num_seqs=64: the buckets are 1, 2, 4, 8, 16, 32, 48, 64."""
    g = graphs_module()
    assert g.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert [g.bucket_for(g.batch_buckets(64), n) for n in (3, 17, 33, 50)] == [4, 32, 48, 64]


@pytest.mark.parametrize("n, bucket", [(3, 4), (17, 32)])
def test_graph_buckets_padding(tiny_llms, monkeypatch, n, bucket):
    """A decode step of n sequences that replays a graph runs its forward over the bucket's rows
    (3 -> 4, 17 -> 32): the bucket - n padding rows are computed too (forced here: the CPU replays
    no graph), and their block tables point at the scratch block, the one block past what the
    BlockManager hands out."""
    llm = tiny_llms("cycle8_graphs")
    assert llm.scheduler.max_num_seqs == 64
    monkeypatch.setattr(llm.model_runner.graphs, "pad_eager", True)
    fed = count_fed_tokens(llm)
    llm.generate([[10 + i, 11, 12] for i in range(n)], greedy("cycle8_graphs", 2))   # 1 prefill, 1 decode
    assert fed == [3 * n, bucket]
    graphs, scratch = llm.model_runner.graphs, llm.model_runner.num_kv_blocks
    assert (graphs.block_tables[n:bucket] == scratch).all()
    assert (graphs.block_tables[:n, 0] != scratch).all()


def test_graph_rows(tiny_llms, monkeypatch):
    """A step of A..E (bucket 8), then of A, C, E (bucket 4): rows 0-2 hold A, C, E, row 3 is
    padding on the scratch block, and rows 4-7, outside the bucket, keep what they held."""
    llm = tiny_llms("cycle8_graphs")
    runner, g = llm.model_runner, llm.model_runner.graphs
    monkeypatch.setattr(g, "pad_eager", True)      # the CPU replays no graph: run the buffers eagerly
    a, b, c, d, e = (new_seq("cycle8_graphs", i, [10 + i] * 3) for i in range(5))
    for block, seq in enumerate((a, b, c, d, e)):
        seq.block_table = [block]
    with torch.inference_mode():
        g.run(*runner._prepare([a, b, c, d, e], is_prefill=False))
        assert g.block_tables[:8, 0].tolist() == [0, 1, 2, 3, 4] + [g.scratch_block] * 3
        g.run(*runner._prepare([a, c, e], is_prefill=False))
    assert g.block_tables[:8, 0].tolist() == [0, 2, 4, g.scratch_block, 4] + [g.scratch_block] * 3
    assert g.input_ids[3] == 0 and g.positions[3] == 0 and g.context_lens[3] == 1


def test_graph_table(tiny_llms):
    """Qwen3-0.6B, 256-token blocks, 256 rows: 160 columns, 163,840 bytes. SmolLM2 on sdpa: a step whose
    longest sequence has 100 tokens attends over 7 blocks, 112 keys."""
    g = graphs_module()
    llm = tiny_llms("cycle8_graphs")
    qwen = g.DecodeGraphs(llm.model_runner.model, "flash_attn", 256, 256, qwen3_0_6b()["max_position_embeddings"],
                          torch.device("cpu"))
    assert qwen.block_tables.shape == (256, 160)
    assert qwen.block_tables.numel() * qwen.block_tables.element_size() == 163_840
    smol = g.DecodeGraphs(llm.model_runner.model, "sdpa", 16, 64, 8192, torch.device("cpu"))
    assert smol.max_blocks == 512
    seqs = [new_seq("cycle8_graphs", 0, [5] * 100), new_seq("cycle8_graphs", 1, [5] * 40)]
    seqs[0].block_table, seqs[1].block_table = list(range(7)), [7, 8, 9]
    assert llm.model_runner.block_size == 16
    _, _, meta = llm.model_runner._prepare(seqs, is_prefill=False)    # sdpa's eager step, as in cycle 7
    assert meta.block_tables.shape[1] == 7 and meta.mask.shape[-1] == 112


# --- the guide itself -------------------------------------------------------------------------

GUIDE = ROOT / "docs" / "CYCLE_GUIDE.md"


def diff_hunk_headers(old_path: str | None, new_path: str) -> set[str]:
    """The `@@ ... @@` lines of `diff -u old new`, as the guide's `diff -ruN` prints them."""
    import subprocess

    old = str(ROOT / old_path) if old_path else "/dev/null"
    out = subprocess.run(["diff", "-u", old, str(ROOT / new_path)], capture_output=True, text=True).stdout
    return {line for line in out.splitlines() if line.startswith("@@")}


def test_guide_quotes_the_code():
    """Every diff the guide quotes is the code's own diff: each `+` line is in the new file, each `-`
    line in the old one, each context line in both, and each hunk header (`@@ -a,b +c,d @@`, with
    `@@ ... @@` marking a cut) is one that `diff -u` of the two files gives. Every line of a
    python block still exists in some cycle's source."""
    import re

    text = GUIDE.read_text()
    stale = []
    for block in re.findall(r"```diff\n(.*?)```", text, re.S):
        lines = block.splitlines()
        old_path = next((line[4:] for line in lines if line.startswith("--- ")), None)
        new_path = next(line[4:] for line in lines if line.startswith("+++ "))
        old = (ROOT / old_path).read_text().splitlines() if old_path else []   # no "---": a new file
        new = (ROOT / new_path).read_text().splitlines()
        headers = diff_hunk_headers(old_path, new_path)
        for line in lines:
            if line.startswith(("--- ", "+++ ")) or line == "@@ ... @@":
                continue
            if line.startswith("@@"):
                if line not in headers:
                    stale.append(f"{new_path}: hunk header {line!r}; diff -u gives {sorted(headers)}")
            elif not line[1:].strip():
                continue
            elif line[0] == "+" and line[1:] not in new:
                stale.append(f"{new_path} lacks the added line {line!r}")
            elif line[0] == "-" and line[1:] not in old:
                stale.append(f"{old_path} lacks the removed line {line!r}")
            elif line[0] == " " and (line[1:] not in new or (old_path and line[1:] not in old)):
                stale.append(f"context line not in both {old_path} and {new_path}: {line!r}")
            elif line[0] not in "+- ":
                stale.append(f"{new_path}: a diff line with no +, - or space marker: {line!r}")
    source = {line for pattern in ("cycle*/*.py", "common/**/*.py") for path in ROOT.glob(pattern)
              for line in path.read_text().splitlines()}
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        stale += [line for line in block.splitlines()
                  if line.strip() and not line.strip().startswith("#") and line not in source]
    assert not stale, "docs/CYCLE_GUIDE.md quotes what the code does not have:\n" + "\n".join(stale)


def test_guide_names_existing_tests():
    """Every `-k NAME` in the guide selects at least one test of this file."""
    import re

    names = set(re.findall(r"-k (\w+)", GUIDE.read_text()))
    tests = [name for name in globals() if name.startswith("test_")]
    assert names and all(any(n in t for t in tests) for n in names), \
        sorted(n for n in names if not any(n in t for t in tests))


def test_logprob_shapes(tiny_llms):
    """9.9: 12 prompt entries (the first None), 5 generated; at most k + 1 keys (top-k and the chosen)."""
    llm = tiny_llms("cycle4_batching", dtype="float32")
    sp = cycle("cycle4_batching").SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2,
                                                 prompt_logprobs=3)
    out = llm.generate([list(range(10, 22))], sp)[0]
    assert len(out.prompt_logprobs) == 12 and out.prompt_logprobs[0] is None
    assert len(out.logprobs) == 5
    # Each dict: the k most likely first (descending), then the chosen token if it was not among
    # them: k keys when it was, k + 1 when not; never empty, the chosen token always there.
    chosen = [(d, t, 3) for d, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])] + \
             [(d, t, 2) for d, t in zip(out.logprobs, out.token_ids)]
    for d, token, k in chosen:
        values = list(d.values())
        top = values[:k]
        assert token in d and len(d) == (k if token in list(d)[:k] else k + 1), (d, token, k)
        assert top == sorted(top, reverse=True) and all(v <= 0 for v in values)
        assert d[token] <= top[0]


def test_penalty_logits():
    """9.10: 7 (prompt, 3.0 > 0): 3 / 2 = 1.5. 9 (output twice, -1.0 < 0): -1 * 2 - 0.5 * 2 - 0.25 = -3.25.
    4 (never seen): 2.0."""
    sampler = importlib.import_module("cycle4_batching.sampler")
    SP = cycle("cycle4_batching").SamplingParams
    logits = torch.zeros(1, 12)
    logits[0, 7], logits[0, 9], logits[0, 4] = 3.0, -1.0, 2.0
    seq = SimpleNamespace(sampling_params=SP(repetition_penalty=2, frequency_penalty=0.5, presence_penalty=0.25),
                          token_ids=[7, 1, 9, 9], num_prompt_tokens=2)
    out = sampler.apply_penalties(logits, [seq])[0]
    assert [out[7].item(), out[9].item(), out[4].item()] == [1.5, -3.25, 2.0]


# --- chapter 11: chunked prefill --------------------------------------------------------------

def _chunked_scheduler(num_blocks, block_size, budget):
    """Cycle 9's Scheduler (it owns the BlockManager), no model: token ids only, never text."""
    config = SimpleNamespace(block_size=block_size, enable_prefix_caching=True, max_num_seqs=8,
                             max_num_batched_tokens=budget, enable_chunked_prefill=True, long_prefill_token_threshold=0)
    processor = importlib.import_module("cycle9_chunked.output_processor").OutputProcessor(None, {2})
    scheduler = importlib.import_module("cycle9_chunked.scheduler").Scheduler(config, num_blocks, processor)
    return scheduler.block_manager, scheduler


def _run_step(scheduler):
    """One step as the engine runs it, token 1 for each row that samples: {seq_id: tokens computed}."""
    seqs, num_tokens = scheduler.schedule()
    samples = sum(s.num_computed_tokens + n == len(s) for s, n in zip(seqs, num_tokens))
    scheduler.postprocess(seqs, num_tokens, importlib.import_module("cycle9_chunked.sampler").SamplerOutput([1] * samples))
    return {s.seq_id: n for s, n in zip(seqs, num_tokens)}


def test_chunked_steps():
    """11.1: three decoding streams and a 40-token prompt, budget 16: chunks of 13, 13, 13, then 1,
    which samples; every step decodes the streams first."""
    _, scheduler = _chunked_scheduler(64, 4, 16)
    scheduler.add([new_seq("cycle9_chunked", i, [10 + i] * 4, max_tokens=20) for i in range(3)], detokenize=False)
    _run_step(scheduler)                                       # the streams' prompts
    long = new_seq("cycle9_chunked", 3, range(100, 140))
    scheduler.add([long], detokenize=False)
    steps = [_run_step(scheduler) for _ in range(4)]
    assert [step[3] for step in steps] == [13, 13, 13, 1]
    assert all(step[i] == 1 for step in steps for i in range(3))
    assert len(long.output_token_ids) == 1                     # its first token: the fourth step


def test_chunked_prefix():
    """11.2: a 50-token prompt with two cached blocks of 16, budget 8: chunks 8, 8, 2; blocks 3, 3, 4."""
    bm, scheduler = _chunked_scheduler(16, 16, 8)
    first = new_seq("cycle9_chunked", 0, list(range(100, 132)) + [7] * 18)
    hashes = bm.prompt_block_hashes(first)
    bm.allocate(first, [], hashes)
    bm.cache_full_blocks(first, 48)                            # its first three blocks are computed
    bm.free(first)
    seq = new_seq("cycle9_chunked", 1, list(range(100, 132)) + [9] * 18)   # shares the first two
    scheduler.add([seq], detokenize=False)
    chunks, blocks = [], []
    while len(seq) == seq.num_prompt_tokens:
        chunks.append(_run_step(scheduler)[1])
        blocks.append(len(seq.block_table))
    assert seq.num_cached_tokens == 32 and chunks == [8, 8, 2] and blocks == [3, 3, 4]


def test_chunked_mask():
    """11.3: context_len 37, 5 queries: query 2 is position 34 and sees keys 0..34."""
    runner_mod = importlib.import_module("cycle9_chunked.model_runner")
    seq = new_seq("cycle9_chunked", 0, [5] * 37)
    seq.num_computed_tokens, seq.block_table = 32, [0, 1, 2]
    runner = object.__new__(runner_mod.ModelRunner)            # only its step layout
    runner.device, runner.block_size, runner.dense_layout = torch.device("cpu"), 16, True
    _, positions, meta = runner._prepare([seq], [5])
    assert positions.tolist() == [32, 33, 34, 35, 36] and int(meta.context_lens[0]) == 37
    assert meta.mask[0, 2].nonzero().flatten().tolist() == list(range(35))


# --- chapter 12: speculative decoding ---------------------------------------------------------

def test_spec_propose():
    """12.1: [5, 9, 2, 7, 5, 9, 3, 5, 9], n from 3 down to 1, k = 3: no earlier [3, 5, 9]; the
    latest earlier [5, 9] is at positions 4-5, followed by [3, 5, 9]."""
    proposer = importlib.import_module("cycle10_speculative.proposer").NgramProposer(3, 1, 3)
    assert proposer.propose([5, 9, 2, 7, 5, 9, 3, 5, 9]) == [3, 5, 9]


def test_spec_rule():
    """12.2: p = (A 0.5, B 0.3, C 0.2), draft B: accepted with probability 0.3; a rejection emits A
    with probability 5/7, C 2/7; A overall 0.5. 20,000 seeded draws, within 0.015 (over 4 standard
    deviations of each estimate)."""
    sampler = importlib.import_module("cycle10_speculative.sampler").Sampler(torch.device("cpu"), seed=0)
    rejection = importlib.import_module("cycle10_speculative.rejection_sampler").RejectionSampler(sampler)
    params = cycle("cycle10_speculative").SamplingParams(temperature=1.0)
    n, A, B = 20000, 0, 1
    seqs = [SimpleNamespace(token_ids=[0], num_prompt_tokens=1, sampling_params=params, generator=None)] * n
    logits = torch.tensor([[0.5, 0.3, 0.2], [1.0, 1.0, 1.0]]).log().repeat(n, 1)   # row 2: after B, unused here
    out = rejection(logits, seqs, [[B]] * n)
    accepted = sum(len(a) for a in out.accepted_token_ids) / n
    rejected_tokens = [t for a, t in zip(out.accepted_token_ids, out.token_ids) if not a]
    assert abs(accepted - 0.3) < 0.015
    assert abs(rejected_tokens.count(A) / len(rejected_tokens) - 5 / 7) < 0.015
    assert abs(rejected_tokens.count(A) / n - 0.5) < 0.015


def test_spec_rollback():
    """12.3: blocks of 4, a 10-token sequence decoding (9 computed, 3 blocks) gets 4 drafts: the step
    computes positions 9-13 and needs 4 blocks; 1 draft accepted: 12 tokens, 11 computed, 3 blocks."""
    config = SimpleNamespace(block_size=4, enable_prefix_caching=True, max_num_seqs=8, max_num_batched_tokens=64,
                             enable_chunked_prefill=True, long_prefill_token_threshold=0,
                             speculative_config={"num_speculative_tokens": 4, "prompt_lookup_min": 1,
                                                 "prompt_lookup_max": 1})
    processor = importlib.import_module("cycle10_speculative.output_processor").OutputProcessor(None, {2})
    scheduler = importlib.import_module("cycle10_speculative.scheduler").Scheduler(config, 16, processor)
    SamplerOutput = importlib.import_module("cycle10_speculative.sampler").SamplerOutput
    seq = new_seq("cycle10_speculative", 0, [7, 8, 9, 7, 8, 9, 7, 8, 9], max_tokens=20)
    scheduler.add([seq], detokenize=False)
    seqs, num_tokens = scheduler.schedule()                   # the prompt: 9 tokens, samples its first
    scheduler.postprocess(seqs, num_tokens, SamplerOutput([7]))
    seqs, num_tokens = scheduler.schedule()                   # a decode of 10 tokens, 9 computed
    assert seq.spec_token_ids == [8, 9, 7, 8] and num_tokens == [5] and len(seq.block_table) == 4
    scheduler.postprocess(seqs, num_tokens, SamplerOutput([5], accepted_token_ids=[[8]]))
    assert len(seq) == 12 and seq.num_computed_tokens == 11 and len(seq.block_table) == 3
    assert scheduler.block_manager.num_free_blocks == 16 - 3


# --- chapter 13: tensor parallelism ------------------------------------------------------------

def test_tp_shapes():
    """13.1: SmolLM2 at tp=3, each rank's matrices: qkv_proj [5 x 64, 576] (3 query heads and 1 KV
    head, k and v), o_proj [576, 192], gate_up_proj [1024, 576], down_proj [576, 512]; 16,384 rows
    of the vocabulary each."""
    from transformers import LlamaConfig

    from cycle11_tp.model import CausalLM
    from cycle11_tp.parallel_state import TPGroup

    config = LlamaConfig(**SMOLLM2_SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    for rank in range(3):
        with torch.device("meta"):
            model = CausalLM(config, "sdpa", TPGroup(rank, 3))
        layer = model.model.layers[0]
        assert tuple(layer.self_attn.qkv_proj.weight.shape) == (320, 576)
        assert tuple(layer.self_attn.o_proj.linear.weight.shape) == (576, 192)
        assert tuple(layer.mlp.gate_up_proj.weight.shape) == (1024, 576)
        assert tuple(layer.mlp.down_proj.linear.weight.shape) == (576, 512)
        assert model.model.embed_tokens.rows == 16384 and model.model.embed_tokens.start == rank * 16384
        # the checkpoint's k_proj rows this rank keeps: its KV head, rows 64r .. 64r + 63
        shard = model.checkpoint_targets()["model.layers.0.self_attn.k_proj.weight"]
        assert (shard.start, shard.size, shard.into) == (64 * rank, 64, 192)


def test_tp_bytes():
    """13.2: fp32 SmolLM2 at tp=3 all-reduces (2 x 30 + 1) x 576 x 4 = 140,544 bytes per token
    computed; a 1,000-token prompt, 140.5 MB. (The engine's counter against this formula, on a
    tiny model: tests/test_tp.py -k all_reduce_bytes_per_token.)"""
    per_token = (2 * SMOLLM2_SHAPE["num_hidden_layers"] + 1) * SMOLLM2_SHAPE["hidden_size"] * 4
    assert per_token == 140_544 and per_token * 1000 / 1e6 == pytest.approx(140.5, abs=0.05)


def test_tp_scales():
    """13.3: a row [1, -4, 2, 8] split over 2 ranks as [1, -4] and [2, 8]. Rank-local AbsMax scales
    would be 4/127 and 8/127 (rank 0 stores 32, -127); with the whole row's max (cycle 11: one max
    all-reduce) both use 8/127 and rank 0 stores 16, -64, the whole row's int8 values."""
    from cycle11_tp.quantization import quantize_absmax

    row = torch.tensor([[1.0, -4.0, 2.0, 8.0]])
    local_q, local_scale = quantize_absmax(row[:, :2])
    assert local_q.tolist() == [[32, -127]] and local_scale.item() == pytest.approx(4 / 127)
    whole_max = lambda amax: torch.maximum(amax, row[:, 2:].abs().amax(dim=1))   # the other rank's max
    q, scale = quantize_absmax(row[:, :2], whole_max)
    assert q.tolist() == [[16, -64]] and scale.item() == pytest.approx(8 / 127)
    assert q.tolist()[0] == quantize_absmax(row)[0].tolist()[0][:2]
