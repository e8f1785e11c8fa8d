"""Every Triton kernel of cycles 6-10, compiled for an A100 (sm_80) and an H100/H200 (sm_90) on this
CPU, through the real launch wrappers at real model shapes (scripts/triton_compile_report.py says
how). A kernel that would not compile for a GPU, spill registers, or ask for more shared memory
than the GPU has fails here, on a machine without one.

The interpreter tests (test_attention.py, test_quantization.py) check what the kernels compute;
these check that the GPU can run them at all, and well."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import triton_compile_report as report  # noqa: E402


@pytest.fixture(scope="module")
def compiled():
    """The engines' configurations in bf16 and fp16 (the GPU dtypes) and the int8 matmul in fp32,
    each distinct specialization compiled once, over every core. To keep the suite fast, the int8
    matmul is compiled at one decode and one prefill row count (M = 1, 512: both tiles) and the other
    head sizes in bf16 only; scripts/triton_compile_report.py compiles all (M = 16 and 17 too, fp32
    attention) into docs/results/triton-compile-sm80-sm90.txt."""
    configs = (report.configurations(dtypes=("bf16", "fp16"), rows=(1, 512))
               + report.configurations(dtypes=("fp32",), rows=(1, 512), attention=False)
               + report.head_size_configurations(dtypes=("bf16",)))
    return configs, report.compile_all(configs)


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    configs, rows = compiled
    # Every configuration compiled both kernels (attention) or its matmuls, for both targets.
    seen = {(label, r["kernel"], r["sm"]) for label, r in rows}
    for config in configs:
        kernels = ("_decode_kernel", "_prefill_kernel") if config.kind == "attention" else ("_int8_matmul_kernel",)
        assert {(config.label, k, sm) for k in kernels for sm in (80, 90)} <= seen, config.label
    assert {c.label.split()[0] for c in configs} == set(report.CYCLES)
    # every cycle that carries a Triton kernel is in the report
    assert set(report.CYCLES) == {p.parent.name for p in ROOT.glob("cycle*/triton_*.py")}


def test_no_spills_and_shared_memory_within_limits(compiled):
    _, rows = compiled
    assert report.problems(rows) == []
    # The decisions the kernels' tile choices rest on, as compiled: Qwen3-0.6B's prefill (head_dim
    # 128) runs on 8 warps, SmolLM2's (64) on 4.
    warps = {(label.split()[1], r["sm"]): r["num_warps"] for label, r in rows
             if r["kernel"] == "_prefill_kernel" and " bf16 " in label}
    assert warps[("Qwen3-0.6B", 80)] == 8 and warps[("SmolLM2-135M", 80)] == 4


def broken_copy(tmp_path, name: str, old: str, new: str) -> str:
    """The cycle 6 kernel file `name` with `old` replaced (once) by `new`, in tmp_path."""
    source = (ROOT / "cycle6_flash" / name).read_text()
    assert old in source
    path = tmp_path / name
    path.write_text(source.replace(old, new, 1))
    return str(path)


def test_a_kernel_that_does_not_compile_fails(tmp_path):
    """q K^T without the transpose: at Qwen3-0.6B's shapes q [16, 128] and k [64, 128] do not chain."""
    path = broken_copy(tmp_path, "triton_attention.py", "tl.dot(q, tl.trans(k)", "tl.dot(q, k")
    config = report.Config("broken Qwen3-0.6B bf16 block_size=16", path, "attention",
                           report.MODELS["Qwen3-0.6B"], "bf16", 16)
    with pytest.raises(RuntimeError, match="_decode_kernel does not compile for sm_80"):
        report.compile_all([config], capabilities=(80,), workers=1)


def test_a_kernel_that_spills_is_reported(tmp_path):
    """Qwen3's prefill on 4 warps, as it was before it got 8: 255 registers and a spill on sm_80."""
    path = broken_copy(tmp_path, "triton_attention.py", "8 if width >= 128 else 4", "4")
    config = report.Config("four_warps Qwen3-0.6B bf16 block_size=16", path, "attention",
                           report.MODELS["Qwen3-0.6B"], "bf16", 16)
    found = report.problems(report.compile_all([config], capabilities=(80,), workers=1))
    assert len(found) == 1 and "_prefill_kernel sm_80 spills" in found[0]


def test_shared_memory_over_the_limit_is_reported():
    row = dict(kernel="_prefill_kernel", sm=80, num_warps=8, num_stages=3, registers=128, spill_bytes=0,
               shared=164 * 1024, constexprs={})
    assert report.problems([("c Qwen3-0.6B bf16 x", row)]) == [
        "c Qwen3-0.6B bf16 x: _prefill_kernel sm_80 needs 167936 B of shared memory, over the 166912 B limit"]
    assert report.problems([("c Qwen3-0.6B bf16 x", dict(row, sm=90))]) == []   # 227 KiB on sm_90
