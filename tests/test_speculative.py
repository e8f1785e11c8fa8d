"""Cycle 10: n-gram speculative decoding with exact rejection sampling.

The proposer alone, the rejection sampler alone (greedy rule, the distribution it samples, k + 1
tokens per step when every draft is right), then the engine: greedy tokens equal cycle 9's, seeded
tokens too, rejected drafts leave the KV cache and the blocks as if never proposed, and the counters.
"""

from types import SimpleNamespace

import pytest
import torch

from conftest import SMOLLM2, cycle

C9, C10 = "cycle9_chunked", "cycle10_speculative"
NgramProposer = cycle(f"{C10}.proposer").NgramProposer
RejectionSampler = cycle(f"{C10}.rejection_sampler").RejectionSampler
Sampler = cycle(f"{C10}.sampler").Sampler
SamplingParams = cycle(C10).SamplingParams
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = [list(range(5, 45)), [7, 8, 9], [3 + i % 90 for i in range(130)], [11], list(range(50, 83)),
           list(range(5, 45)) + [60, 61], [3, 4] * 10 + [3], [5, 6, 7, 8, 9] * 4 + [5, 6]]   # 8; patterns to copy

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def engines(tiny_checkpoints):
    """engines(cycle, ckpt="qwen3", spec=False, fresh=False, **options): tiny_llms with a
    speculative_config (a dict, which tiny_llms' cache cannot key on); fresh: not cached, for a
    test that changes the engine's proposer."""
    cache = {}

    def get(name, ckpt="qwen3", spec=False, fresh=False, **options):
        key = (name, ckpt, spec, tuple(sorted(options.items())))
        extra = {"speculative_config": SPEC} if spec else {}
        build = lambda: cycle(name).LLM(tiny_checkpoints[ckpt][0], device="cpu", **options, **extra)
        if fresh:
            return build()
        if key not in cache:
            cache[key] = build()
        return cache[key]
    return get


# --- the proposer -----------------------------------------------------------------------------

def test_proposer_copies_what_followed_the_latest_match():
    p = NgramProposer(3, 1, 2)
    assert p.propose([1, 2, 3, 4, 2, 3]) == [4, 2, 3]
    assert p.propose([1, 2, 3, 4, 2, 3], k=1) == [4]
    assert p.propose([9, 5, 1, 8, 5, 2, 5]) == [2, 5, 2]          # latest [5]: followed by 2, then the copy goes on
    assert p.propose([1, 2, 3, 4, 5]) == []                        # 5 never occurred before
    assert p.propose([7]) == [] and p.propose([7, 7, 7]) == [7, 7, 7]
    assert p.propose([1, 2, 3, 4, 2, 3], k=0) == []


def test_proposer_prefers_the_longest_ngram():
    tokens = [1, 2, 3, 7, 9, 2, 3, 8, 5, 1, 2, 3]   # [2, 3] last seen before 8; [1, 2, 3] before 7
    assert NgramProposer(2, 1, 3).propose(tokens) == [7, 9]
    assert NgramProposer(2, 1, 2).propose(tokens) == [8, 5]
    assert NgramProposer(2, 4, 4).propose(tokens) == []            # no 4-gram repeats


def test_proposer_adapts_to_what_was_accepted():
    p, seq = NgramProposer(4, 1, 2), SimpleNamespace(spec_draft_len=None, spec_skip=0)
    assert p.draft_len(seq) == 4
    p.record(seq, 4, 1)
    assert p.draft_len(seq) == 2
    p.record(seq, 2, 0)                 # nothing accepted: no proposals for a few steps
    assert [p.draft_len(seq) for _ in range(5)] == [0, 0, 0, 0, 1]


@pytest.mark.parametrize("bad", [{"method": "eagle", "num_speculative_tokens": 2},
                                 {"method": "ngram", "num_speculative_tokens": 2, "model": "x"},
                                 {"method": "ngram"}, {"method": "ngram", "num_speculative_tokens": 0},
                                 {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
                                  "prompt_lookup_max": 2}, "ngram"])
def test_bad_speculative_configs_are_refused(bad):
    with pytest.raises(ValueError, match="speculative_config"):
        cycle(f"{C10}.config").Config("m", device="cpu", speculative_config=bad)
    with pytest.raises(ValueError, match="enable_chunked_prefill"):
        cycle(f"{C10}.config").Config("m", device="cpu", speculative_config=SPEC, enable_chunked_prefill=False)


# --- the rejection sampler alone --------------------------------------------------------------

def row_seq(params, context, generator=None):
    return SimpleNamespace(token_ids=list(context), num_prompt_tokens=1, sampling_params=params, generator=generator)


def test_greedy_accepts_while_the_argmax_agrees_then_emits_the_targets_token():
    rs = RejectionSampler(Sampler(torch.device("cpu"), seed=0))
    argmax = [2, 0, 3, 1]                                        # row j's target token
    logits = torch.nn.functional.one_hot(torch.tensor(argmax), 4).float() * 5
    params = SamplingParams(temperature=0)
    out = rs(logits, [row_seq(params, [1])], [[2, 0, 1]])        # third draft wrong
    assert out.accepted_token_ids == [[2, 0]] and out.token_ids == [3]
    out = rs(logits, [row_seq(params, [1])], [[2, 0, 3]])        # all right: the last row's bonus
    assert out.accepted_token_ids == [[2, 0, 3]] and out.token_ids == [1]
    out = rs(logits[:1], [row_seq(params, [1])], [[]])           # no drafts: the plain greedy token
    assert out.accepted_token_ids == [[]] and out.token_ids == [2]


# A Markov chain "model" on 4 tokens: the next token's distribution depends on the last token only.
P = torch.tensor([[0.50, 0.25, 0.15, 0.10], [0.10, 0.20, 0.30, 0.40], [0.25, 0.25, 0.25, 0.25],
                  [0.60, 0.05, 0.05, 0.30]])


def speculative_pairs(draft_of, params, trials, k=2):
    """The first two tokens after context [0], generated with drafts from draft_of(context) and
    kept by the rejection sampler; each trial a sequence of its own, all in one batched call."""
    rs = RejectionSampler(Sampler(torch.device("cpu"), seed=1234))
    got = [[] for _ in range(trials)]
    while any(len(g) < 2 for g in got):
        todo = [i for i, g in enumerate(got) if len(g) < 2]
        seqs = [row_seq(params, [0] + got[i]) for i in todo]
        drafts = [draft_of(s.token_ids, k) for s in seqs]
        logits = torch.cat([P[[(s.token_ids + d)[len(s.token_ids) - 1 + j] for j in range(len(d) + 1)]].log()
                            for s, d in zip(seqs, drafts)])
        out = rs(logits, seqs, drafts)
        for i, accepted, token in zip(todo, out.accepted_token_ids, out.token_ids):
            got[i] += accepted + [token]
    return got


def chain(pick):
    """A deterministic proposer: k tokens, each pick(row of P) after the previous one."""
    def draft_of(tokens, k):
        out = []
        for _ in range(k):
            out.append(int(pick(P[(tokens + out)[-1]])))
        return out
    return draft_of


# The chi-square distribution's 0.999 quantile at 15 degrees of freedom (16 cells, the total fixed):
# a statistic above it has p < 0.001 (scipy.stats.chi2.ppf(0.999, 15) = 37.697).
CHI2_15_DOF_P001 = 37.697


@pytest.mark.parametrize("name, draft_of", [("likeliest", chain(torch.argmax)), ("worst", chain(torch.argmin)),
                                            ("none", lambda tokens, k: [])])
def test_the_output_distribution_is_the_targets_whatever_the_proposer(name, draft_of):
    """Chi-square goodness of fit of the 16 two-token outcomes against P(a | 0) P(b | a), 8,000
    trials (every expected count >= 40): a correct sampler fails at p < 0.001 once in 1,000 seeds;
    the seeds are fixed, so the test is deterministic. The worst proposer's drafts alone are one
    fixed pair: accepting them blindly would put every trial in one cell."""
    trials = 8000
    pairs = speculative_pairs(draft_of, SamplingParams(temperature=1.0), trials)
    observed = torch.zeros(4, 4)
    for a, b, *_ in pairs:
        observed[a, b] += 1
    expected = P[0].unsqueeze(1) * P * trials
    statistic = float(((observed - expected) ** 2 / expected).sum())
    assert statistic < CHI2_15_DOF_P001, (name, statistic)


def test_a_proposer_that_is_always_right_gives_k_plus_one_tokens_per_step():
    rs, k = RejectionSampler(Sampler(torch.device("cpu"), seed=0)), 3
    seq = row_seq(SamplingParams(temperature=0), [0])
    drafts = chain(torch.argmax)(seq.token_ids, k)
    logits = P[[([0] + drafts)[j] for j in range(k + 1)]].log()
    out = rs(logits, [seq], [drafts])
    assert len(out.accepted_token_ids[0]) + 1 == k + 1 and out.accepted_token_ids[0] == drafts


# --- the engine -------------------------------------------------------------------------------

def tokens(llm, name, prompts=PROMPTS, n=12, **params):
    params = dict(temperature=0, max_tokens=n, ignore_eos=True) | params
    return [o.token_ids for o in llm.generate(prompts, cycle(name).SamplingParams(**params))]


@pytest.mark.parametrize("ckpt", ["qwen3", "llama"])
def test_greedy_tokens_equal_cycle9s(ckpt, engines):
    reference = tokens(engines(C9, ckpt), C9)
    for budget in (16, 64, None):
        for caching in (True, False):
            llm = engines(C10, ckpt, spec=True, max_num_batched_tokens=budget, enable_prefix_caching=caching)
            assert tokens(llm, C10) == reference, (budget, caching)
            assert llm.stats["spec_decode_num_accepted_tokens"] > 0   # speculation did run and hit
    fp32 = engines(C10, ckpt, spec=True, quantization=None)           # float weights: cycle 9's float tokens
    assert tokens(fp32, C10) == tokens(engines(C9, ckpt, quantization=None), C9)
    one = engines(C10, ckpt, spec=True)
    assert [tokens(one, C10, [p])[0] for p in PROMPTS[-2:]] == reference[-2:]   # batch 1


def test_preemption_with_speculation_changes_nothing(engines):
    reference = tokens(engines(C9), C9)
    small = engines(C10, spec=True, num_kv_blocks=36, block_size=4, max_num_batched_tokens=16)
    assert tokens(small, C10) == reference
    assert small.stats["preemptions"] > 0 and small.stats["spec_decode_num_accepted_tokens"] > 0
    assert small.scheduler.block_manager.num_free_blocks == 36


def test_seeded_sampling_is_cycle9s_and_reproducible(engines):
    """One exponential draw per emitted token, from the request's generator (rejection_sampler.py):
    with speculation, a seeded request gets the tokens it gets without, penalties included."""
    params = dict(temperature=0.8, top_k=50, seed=7, repetition_penalty=1.2, min_tokens=4)
    seeded = [cycle(C9).SamplingParams(**params, max_tokens=12, ignore_eos=True)] * len(PROMPTS)
    reference = [o.token_ids for o in engines(C9).generate(PROMPTS, seeded)]
    llm = engines(C10, spec=True)
    assert tokens(llm, C10, **params) == reference == tokens(llm, C10, **params)
    assert llm.stats["spec_decode_num_draft_tokens"] > 0


def held(llm, seq_id):
    """The sequence (None once finished) and its computed K and V of every layer, through its block table."""
    seq = next((s for s in llm.scheduler.running if s.seq_id == seq_id), None)
    if seq is None:
        return None, None
    cache, bs = llm.model_runner.kv_cache, llm.config.block_size
    slots = torch.tensor([seq.block_table[p // bs] * bs + p % bs for p in range(seq.num_computed_tokens)])
    return seq, [t.flatten(0, 1)[slots] for t in cache.k + cache.v]


@pytest.mark.parametrize("num_right", [0, 1, 2])
def test_rejected_drafts_leave_the_cache_as_if_never_proposed(engines, num_right):
    """Drafts whose first num_right tokens are right and the rest wrong (block size 4: some drafts
    take blocks of their own). Whenever cycle 9 reaches the same tokens, the spec engine holds what
    it holds: computed tokens, blocks, free blocks, K/V."""
    options = dict(block_size=4, quantization=None, enable_prefix_caching=False)
    c9, c10 = engines(C9, **options), engines(C10, spec=True, fresh=True, **options)
    vocab = c10.describe()["vocab_size"]
    params = {n: cycle(n).SamplingParams(temperature=0, max_tokens=14, ignore_eos=True) for n in (C9, C10)}
    reference = tokens(c9, C9, [PROMPTS[1]], n=14)[0]
    right = lambda n: reference[n - 3:]                      # the tokens after the first n
    wrong = lambda n: (right(n)[0] + 1) % vocab
    c10.scheduler.proposer.propose = lambda ids, k: (right(len(ids))[:num_right] + [wrong(len(ids))] * k)[:k]
    r9, r10 = c9.add_request(PROMPTS[1], params[C9]), c10.add_request(PROMPTS[1], params[C10])
    compared = 0
    while c10.has_unfinished_requests():
        c10.step()
        s10, kv10 = held(c10, r10)
        while s10 is not None and len(held(c9, r9)[0] or ()) < len(s10):
            c9.step()
        s9, kv9 = held(c9, r9)
        if s10 is None or s9 is None:
            break
        assert s10.token_ids == s9.token_ids and s10.num_computed_tokens == s9.num_computed_tokens
        assert len(s10.block_table) == len(s9.block_table)
        assert c10.scheduler.block_manager.num_free_blocks == c9.scheduler.block_manager.num_free_blocks
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kv9, kv10))
        compared += 1
    while c9.has_unfinished_requests():
        c9.step()
    assert compared >= 2 and c10.scheduler.spec_num_draft_tokens > 0
    accepted = c10.scheduler.spec_num_accepted_tokens   # fewer near max_tokens, where drafts are cut short
    assert accepted <= num_right * c10.scheduler.spec_num_drafts and (accepted > 0) == (num_right > 0)


def test_right_drafts_give_k_plus_one_tokens_per_step(engines):
    llm = engines(C10, spec=True, fresh=True)
    reference = tokens(engines(C9), C9, [PROMPTS[0]], n=13)[0]
    llm.scheduler.proposer.propose = lambda token_ids, k: reference[len(token_ids) - 40:][:k]
    assert tokens(llm, C10, [PROMPTS[0]], n=13)[0] == reference
    assert llm.stats["steps"] == 4                    # the prompt's step (1 token), then 3 steps of 4
    assert llm.stats["spec_decode_mean_acceptance_length"] == 4
    assert llm.stats["spec_decode_acceptance_per_position"] == [1, 1, 1]


QUESTIONS = ["Repeat exactly: 'the quick brown fox jumps over the lazy dog, the quick brown fox'.", "Hi!", "2+2=",
             "Fix the typo and print the code again: def add(a, b):\n    retrun a + b",
             "Quote the first line of: 'Roses are red,\nviolets are blue.'", "Name three colors.",
             "Write the word 'banana' five times.", "What is the capital of France?"]


@pytest.mark.slow
def test_greedy_tokens_equal_cycle9s_on_real_smollm2():
    """Batch 8 and batch 1 on the default pool, then a pool of 5 blocks that forces preemption;
    prefix caching and chunking on (the chat template's system prompt is a shared prefix)."""
    engines = {}
    for name, spec in ((C9, None), (C10, SPEC)):
        for blocks, budget in ((None, None), (5, 32)):
            extra = {"speculative_config": spec} if spec else {}
            engines[name, blocks] = cycle(name).LLM(SMOLLM2, device="cpu", dtype="float32", num_kv_blocks=blocks,
                                                    max_num_batched_tokens=budget, **extra)
    chat = engines[C9, None].tokenizer.apply_chat_template
    prompts = [chat([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in QUESTIONS]
    assert tokens(engines[C10, None], C10, prompts, 16) == tokens(engines[C9, None], C9, prompts, 16)
    assert engines[C10, None].stats["spec_decode_num_accepted_tokens"] > 0
    assert tokens(engines[C10, None], C10, prompts[:1], 16) == tokens(engines[C9, None], C9, prompts[:1], 16)
    assert tokens(engines[C10, 5], C10, prompts[:3], 16) == tokens(engines[C9, 5], C9, prompts[:3], 16)
    assert engines[C10, 5].stats["preemptions"] > 0


def test_counters_reach_load_and_metrics(engines):
    """llm.load() carries vLLM's counters; the engine core passes them on and /metrics shows them."""
    from common.serving.engine_core import EngineCore
    from common.serving.metrics import ServerMetrics, parse_metrics

    llm = engines(C10, spec=True)
    tokens(llm, C10, PROMPTS[-1:])
    load = llm.load()
    assert load["spec_decode_num_accepted_tokens"] <= load["spec_decode_num_draft_tokens"]
    assert load["spec_decode_num_accepted_tokens"] > 0 and load["spec_decode_mean_acceptance_length"] > 1
    snapshot = EngineCore.stats(SimpleNamespace(llm=llm, prompt_tokens_total=0, generation_tokens_total=0,
                                                num_steps=0, step_seconds_total=0.0))
    metrics = parse_metrics(ServerMetrics("m").render(snapshot))
    assert metrics["spec_decode_num_draft_tokens_total"] == load["spec_decode_num_draft_tokens"]
    assert metrics["spec_decode_num_accepted_tokens_total"] == load["spec_decode_num_accepted_tokens"]
    per_pos = [metrics[f'spec_decode_num_accepted_tokens_per_pos_total{{position="{p}"}}'] for p in range(3)]
    assert per_pos == load["spec_decode_num_accepted_tokens_per_pos"] and sum(per_pos) == load["spec_decode_num_accepted_tokens"]
    off = engines(C9)
    tokens(off, C9, PROMPTS[-1:])
    assert "spec_decode_num_drafts" not in off.load()   # off (cycle 9): no counters, never a made-up 0


def test_stops_inside_accepted_drafts_end_the_request_there(char_checkpoint):
    """A stop token or stop string met among a step's accepted drafts ends the request at it, as
    cycle 9 ends it; logprobs requests (never drafted for) keep theirs, beside drafted ones."""
    c9 = cycle(C9).LLM(char_checkpoint, device="cpu")
    c10 = cycle(C10).LLM(char_checkpoint, device="cpu", speculative_config=SPEC)
    prompt = "abcabcabcabcabcab"
    base = c9.generate([prompt], cycle(C9).SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    cases = [dict(stop_token_ids=[base.token_ids[9]]), dict(stop=[base.text[8:11]]), dict(logprobs=2),
             dict(stop=[base.text[5:7]], include_stop_str_in_output=True)]
    for case in cases:
        params = dict(temperature=0, max_tokens=24, ignore_eos=True, **case)
        want = c9.generate([prompt] * 2, [cycle(C9).SamplingParams(**params),
                                          cycle(C9).SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)])
        got = c10.generate([prompt] * 2, [cycle(C10).SamplingParams(**params),
                                          cycle(C10).SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)])
        for w, g in zip(want, got):
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), case
        assert got[0].logprobs is None or [sorted(d) for d in got[0].logprobs] == [sorted(d) for d in want[0].logprobs]
    assert c10.stats["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.cuda
def test_graphs_replay_pure_decode_steps_and_tokens_equal_cycle9s_on_cuda(tiny_checkpoints):
    """On CUDA: greedy tokens equal cycle 9's with speculation on; a step without drafts (a request
    with logprobs is never drafted for) still replays a captured graph, a step with drafts runs eagerly."""
    path = tiny_checkpoints["qwen3"][0]
    c9 = cycle(C9).LLM(path, device="cuda", dtype="float32")
    c10 = cycle(C10).LLM(path, device="cuda", dtype="float32", speculative_config=SPEC)
    assert tokens(c10, C10) == tokens(c9, C9) and c10.stats["spec_decode_num_accepted_tokens"] > 0
    graphs, replays = c10.model_runner.graphs, []
    run = graphs.run
    graphs.run = lambda *args: replays.append(1) or run(*args)
    tokens(c10, C10, PROMPTS[:1], logprobs=1)
    assert graphs.replays and len(replays) == 11 and c10.stats["spec_decode_num_drafts"] == 0


def test_a_step_streams_all_its_tokens_and_their_text(char_checkpoint):
    """step() gives a request all the tokens a verification kept, in one output, with their text;
    the deltas add up to cycle 9's text and tokens, stop string cut included."""
    c9 = cycle(C9).LLM(char_checkpoint, device="cpu")
    c10 = cycle(C10).LLM(char_checkpoint, device="cpu", speculative_config=SPEC)
    prompt = "abcabcabcabcabcab"
    want = c9.generate([prompt], cycle(C9).SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    for stop in ((), (want.text[12:14],)):
        c10.add_request(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=stop))
        tokens_seen, text, sizes = [], "", []
        while c10.has_unfinished_requests():
            for out in c10.step():
                tokens_seen += out.new_token_ids
                text += out.delta_text
                sizes.append(len(out.new_token_ids))
                final = out
        assert final.finished and tokens_seen == final.token_ids and text == final.text
        assert max(sizes) > 1                      # some step gave several tokens
        if not stop:
            assert final.token_ids == want.token_ids and text == want.text
        else:
            assert text == want.text[:want.text.index(stop[0])] and final.finish_reason == "stop"
