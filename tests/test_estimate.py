"""common/benchmark/estimate.py: the cost model the CUDA workload sizes were chosen by. Its step structure
must be what the engines really run, and the guide must quote its output as it is."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.benchmark import estimate
from conftest import cycle

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16]]
MAX_TOKENS = [2, 5, 3]


def _requests():
    return [SimpleNamespace(prompt_token_ids=p, max_tokens=m) for p, m in zip(PROMPTS, MAX_TOKENS)]


def _params(c):
    return [c.SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


@pytest.mark.parametrize("max_num_seqs", [2, 3])
def test_naive_steps_are_the_forwards_cycle1_runs(tiny_llms, max_num_seqs):
    llm = tiny_llms("cycle1_naive", max_num_seqs=max_num_seqs)
    model = llm.model_runner.model
    shapes, forward = [], model.forward

    def recording(input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return forward(input_ids, *args, **kwargs)

    model.forward = recording
    try:
        llm.generate(PROMPTS, _params(cycle("cycle1_naive")))
    finally:
        del model.forward
    assert shapes == list(estimate.naive_steps(_requests(), max_num_seqs))


def test_batched_steps_are_cycle4s_steps(tiny_llms):
    llm = tiny_llms("cycle4_batching")
    llm.generate(PROMPTS, _params(cycle("cycle4_batching")))
    planned = estimate.batched_steps(_requests(), max_num_seqs=64, max_num_batched_tokens=4096)
    assert llm.stats["steps"] == sum(prefill + decode for prefill, decode, _ in planned)
    budget = estimate.batched_steps(_requests(), max_num_seqs=64, max_num_batched_tokens=5)
    assert budget[0][0] == 3    # 12 prompt tokens in steps of at most 5


def test_score_traffic_counts_the_casts_only_outside_fp32():
    assert estimate.score_traffic_per_element(torch.bfloat16) == 28
    assert estimate.score_traffic_per_element(torch.float32) == 24


def test_linear_params_are_the_models_own(tiny_llms):
    """Every parameter of the model but the embedding (tied to the lm_head) and the norms."""
    llm = tiny_llms("cycle1_naive")
    # state_dict: Parameters, and the linear weights packed for oneDNN on an x86 CPU (buffers)
    counted = sum(t.numel() for n, t in llm.model_runner.model.state_dict().items()
                  if not n.endswith("norm.weight") and "embed_tokens" not in n and "lm_head" not in n)
    assert estimate.linear_params(llm.source.config) == counted


def test_the_guide_quotes_the_estimate_as_printed():
    out = subprocess.run([sys.executable, "-m", "common.benchmark.estimate"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    guide = (ROOT / "docs" / "CYCLE_GUIDE.md").read_text()
    table = [line for line in out.stdout.splitlines() if line.startswith(("| throughput", "| nano_vllm_bench", "check:"))]
    assert len(table) == 3
    for line in table:
        assert line in guide, f"the guide does not quote: {line}"
