"""The command line a reader runs first."""

import argparse
import subprocess
import sys

import pytest

from common.engine.args import add_model_args, parse_options
from conftest import CYCLES, SMOLLM2


@pytest.mark.parametrize("name", CYCLES)
def test_run_prints_completions_and_metrics(name, tiny_checkpoints):
    path = tiny_checkpoints["llama"][0]
    result = subprocess.run([sys.executable, "-m", f"{name}.run", "Hello", "Hi there", "--model", path,
                             "--max-tokens", "5", "--temperature", "0", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- ") == 2
    assert "tok/s" in result.stdout and "weights: real" in result.stdout


def test_run_reports_bad_input_clearly(tiny_checkpoints):
    path = tiny_checkpoints["llama"][0]
    result = subprocess.run([sys.executable, "-m", "cycle1_naive.run", "Hello", "--model", path,
                             "--max-tokens", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "max_tokens" in result.stderr


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    result = subprocess.run([sys.executable, "-m", "cycle1_naive.run", "--model", SMOLLM2, "--chat",
                             "--temperature", "0", "--max-tokens", "20", "What is the capital of France?"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_model_args_and_options_parse():
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--model", "m", "--weights", "random", "--option", "max_num_seqs=8", "--option", "x=0.5",
                         "--option", "quantization=None", "--option", "compile=true", "--option", "name=a=b"])
    assert (args.model, args.weights, args.device, args.dtype) == ("m", "random", None, None)
    assert parse_options(args.option) == {"max_num_seqs": 8, "x": 0.5, "quantization": None, "compile": True,
                                          "name": "a=b"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_options(["max_num_seqs"])
    with pytest.raises(SystemExit):  # argparse refuses a weights kind it does not know
        p.parse_args(["--weights", "fake"])
    served = argparse.ArgumentParser()
    add_model_args(served, model_positional=True)
    assert served.parse_args(["some/model", "--device", "cpu"]).model == "some/model"


def test_vllm_flag_names_are_options_in_order():
    """vLLM's spelling of an engine option is the same KEY=VALUE as --option, kept in command-line order
    (a later one wins, as in vLLM), switches both ways, and a JSON object becomes a dict."""
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--max-num-batched-tokens", "512", "--option", "max_num_seqs=4", "--no-enable-prefix-caching",
                         "--enforce-eager", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                         "--option", "max_num_batched_tokens=64"])
    assert args.option == ["max_num_batched_tokens=512", "max_num_seqs=4", "enable_prefix_caching=false",
                           "enforce_eager=true", 'speculative_config={"method": "ngram", "num_speculative_tokens": 3}',
                           "max_num_batched_tokens=64"]
    assert parse_options(args.option) == {"max_num_batched_tokens": 64, "max_num_seqs": 4, "enable_prefix_caching": False,
                                          "enforce_eager": True,
                                          "speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    with pytest.raises(SystemExit, match="not valid JSON"):
        parse_options(["speculative_config={method: ngram}"])


def test_an_option_the_engine_does_not_take_is_refused(tiny_checkpoints):
    """--max-num-batched-tokens on cycle 1 (static batches, no token budget) is an error, not ignored."""
    out = subprocess.run([sys.executable, "-m", "cycle1_naive.run", "Hi", "--model", str(tiny_checkpoints["llama"][0]),
                          "--max-tokens", "2", "--max-num-batched-tokens", "64"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "max_num_batched_tokens" in out.stderr
