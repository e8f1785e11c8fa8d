"""The command line a reader runs first."""

import subprocess
import sys

import pytest

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
