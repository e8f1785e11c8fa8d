"""Logprobs: the OpenAI forms (common/serving/logprobs.py), and the engine's against HF's log_softmax."""

import math

import pytest

from common.serving.logprobs import chat_logprobs, completion_logprobs, echo_completion_logprobs

WORDS = {1: "Hello", 2: ",", 3: " world", 4: "!", 5: "\u00e9", 6: "x"}
decode = WORDS.__getitem__


def test_completion_form_lists_every_position():
    lps = [{3: -0.1, 6: -2.5}, {6: -0.3, 5: -1.0, 4: -4.0}]      # the chosen 4 is outside the top 2
    out = completion_logprobs([3, 4], lps, decode)
    assert out["tokens"] == [" world", "!"]
    assert out["token_logprobs"] == [-0.1, -4.0]
    assert out["top_logprobs"] == [{" world": -0.1, "x": -2.5}, {"x": -0.3, "\u00e9": -1.0, "!": -4.0}]
    assert out["text_offset"] == [0, 6]


def test_echo_puts_the_prompt_first_with_none():
    prompt = [1, 2]
    out = echo_completion_logprobs(prompt, [None, {2: -0.5}], [3], [{3: -0.25}], decode)
    assert out["tokens"] == ["Hello", ",", " world"]
    assert out["token_logprobs"] == [None, -0.5, -0.25]
    assert out["top_logprobs"][0] is None
    assert out["text_offset"] == [0, 5, 6]


def test_offsets_start_where_a_streamed_chunk_starts_and_minus_inf_is_finite():
    out = completion_logprobs([4], [{4: -math.inf}], decode, text_offset=11)
    assert out["text_offset"] == [11]
    assert out["token_logprobs"] == [-9999.0]
    assert completion_logprobs([], [], decode)["text_offset"] == []


def test_chat_form_has_exactly_k_alternatives_and_bytes():
    lps = [{6: -0.3, 5: -1.0, 4: -4.0}]                           # top 2, then the chosen 4
    out = chat_logprobs([4], lps, decode, top_logprobs=2)
    (entry,) = out["content"]
    assert entry["token"] == "!" and entry["logprob"] == -4.0 and entry["bytes"] == [33]
    assert [t["token"] for t in entry["top_logprobs"]] == ["x", "\u00e9"]
    assert entry["top_logprobs"][1]["bytes"] == [0xC3, 0xA9]
    assert chat_logprobs([4], lps, decode)["content"][0]["top_logprobs"] == []


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        completion_logprobs([1, 2], [None], decode)
    with pytest.raises(ValueError):
        chat_logprobs([1], [], decode)
