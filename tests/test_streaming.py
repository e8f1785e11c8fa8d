"""The streaming engine API (cycle 4 on): step() outputs, incremental detokenization, stop strings, aborts."""

import pytest

from common.engine.detokenizer import IncrementalDetokenizer, normalize_stop
from conftest import CYCLES, SMOLLM2, cycle

STREAMING = [c for c in CYCLES if int(c[5]) >= 4]
PREFIX_CACHING = [c for c in STREAMING if c != "cycle4_batching"]


@pytest.fixture(scope="module")
def char_llms(char_checkpoint):
    cache = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = cycle(name).LLM(char_checkpoint, device="cpu", **options)
        return cache[key]
    return get


def greedy(name, n, **kw):
    return cycle(name).SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def run_until_done(llm) -> dict[int, list]:
    """Every step's outputs, per request, in order."""
    seen: dict[int, list] = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


@pytest.mark.parametrize("name", STREAMING)
def test_step_streams_every_token_and_the_deltas_make_the_text(name, char_llms):
    llm = char_llms(name)
    prompts, lengths = ["Hello", "Once upon", "abc"], [7, 3, 11]
    expected = llm.generate(prompts, [greedy(name, n) for n in lengths])
    ids = [llm.add_request(p, greedy(name, n)) for p, n in zip(prompts, lengths)]
    seen = run_until_done(llm)
    for rid, n, final in zip(ids, lengths, expected):
        outs = seen[rid]
        assert len(outs) == n and all(len(o.new_token_ids) == 1 for o in outs)
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert [o.new_token_ids[0] for o in outs] == final.token_ids == outs[-1].token_ids
        assert "".join(o.delta_text for o in outs) == final.text == outs[-1].text
        assert len(final.text) >= n - 1


def test_detokenizer_never_splits_a_multibyte_character():
    from common.engine.model_source import load_tokenizer, resolve_model

    try:
        tokenizer = load_tokenizer(resolve_model(SMOLLM2))
    except ValueError as error:
        pytest.skip(f"SmolLM2 is not available offline here: {error}")
    text = "Hi 😀 and 你好吗, ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)   # the tokenizer does split characters
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Say:").input_ids)
    deltas = [detok.update(t, finishing=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_stop_string_is_cut_and_never_streamed(char_llms):
    llm = char_llms("cycle4_batching")
    free = llm.generate(["Hello"], greedy("cycle4_batching", 20))[0].text
    stop = free[4:6]
    detok = IncrementalDetokenizer(llm.tokenizer, [], normalize_stop([stop, "\x00never"]))
    streamed = "".join(detok.update(t) for t in llm.tokenizer(free, add_special_tokens=False).input_ids)
    assert detok.stopped and streamed == detok.text == free[:free.index(stop)]
    with pytest.raises(ValueError, match="stop"):
        normalize_stop(["ok", ""])


@pytest.mark.parametrize("name", STREAMING)
def test_stop_string_finishes_the_request(name, char_llms):
    llm = char_llms(name)
    free = llm.generate(["Hello"], greedy(name, 20))[0]
    stop = free.text[5:7]
    out = llm.generate(["Hello"], greedy(name, 20, stop=stop))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.index(stop)]
    assert len(out.token_ids) < 20 and llm.scheduler.block_manager.num_free_blocks == llm.scheduler.block_manager.num_blocks


@pytest.mark.parametrize("name", STREAMING)
def test_detokenize_false_streams_token_ids_only(name, char_llms):
    """add_request(detokenize=False): the same tokens, no text at all, and a stop string is not
    checked (the caller, which detokenizes, does that)."""
    llm = char_llms(name)
    free = llm.generate(["Hello"], greedy(name, 20))[0]
    rid = llm.add_request("Hello", greedy(name, 20, stop=free.text[5:7]), detokenize=False)
    outs = run_until_done(llm)[rid]
    assert [o.new_token_ids[0] for o in outs] == free.token_ids == outs[-1].token_ids
    assert all(o.delta_text == "" for o in outs) and outs[-1].text == "" and outs[-1].finish_reason == "length"


@pytest.mark.parametrize("name", STREAMING)
def test_abort_frees_waiting_and_running_requests_at_once(name, char_llms):
    llm = char_llms(name, max_num_seqs=1)
    bm = llm.scheduler.block_manager
    running = llm.add_request("a long request", greedy(name, 40))
    waiting = llm.add_request("another one", greedy(name, 40))
    llm.step()
    assert bm.num_used_blocks > 0 and len(llm.scheduler.waiting) == 1
    assert llm.abort_request(waiting) and llm.abort_request(running)
    assert bm.num_free_blocks == bm.num_blocks and not llm.has_unfinished_requests()
    assert not llm.abort_request(running)                      # already gone
    assert len(llm.generate(["ok"], greedy(name, 3))[0].token_ids) == 3


@pytest.mark.parametrize("name", PREFIX_CACHING)
def test_abort_keeps_shared_prefix_blocks_for_the_other_request(name, char_llms):
    llm = char_llms(name, block_size=4)
    bm = llm.scheduler.block_manager
    prefix = "The same long shared prefix text. "
    alone = llm.generate([prefix + "B"], greedy(name, 12))[0].token_ids
    a = llm.add_request(prefix + "A", greedy(name, 30))
    llm.step()                                                   # a computes (and caches) the prefix
    b = llm.add_request(prefix + "B", greedy(name, 12))
    llm.step()                                                   # b is admitted on a's cached blocks
    seq_b = next(s for s in llm.scheduler.running if s.seq_id == b)
    assert seq_b.num_cached_tokens > 0
    assert llm.abort_request(a)
    outs = run_until_done(llm)
    assert outs[b][-1].token_ids == alone and a not in outs
    assert bm.num_free_blocks == bm.num_blocks and all(block.ref_count == 0 for block in bm.blocks)
