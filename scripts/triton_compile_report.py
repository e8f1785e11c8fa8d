"""Compile every Triton kernel of cycles 6-9 for an A100 (sm_80) and an H100/H200 (sm_90), on a
machine without a GPU, and print what each compiled kernel uses: registers, spills, shared memory.

How, without a GPU: each cycle's kernel file is loaded afresh with Triton's interpreter off, so its
kernels are real JIT functions; the module's launch wrappers (paged_decode_attention, ...) are
called on `device="meta"` tensors of a real model's shapes, with each kernel replaced by a recorder
that keeps the launch arguments instead of launching. Triton's own binder turns those arguments into
the exact specialization a GPU launch would compile (signature, constexprs, divisibility attributes,
num_warps, num_stages), and `triton.compile` takes it down to a cubin for the target with the ptxas
that the triton wheel ships. cuobjdump reads registers and stack bytes back from the cubin: a kernel
with a stack frame spills registers to local memory (our kernels have no local arrays).

Specializations shared by several configurations (the cycles carry identical kernel files)
are compiled once, over one process per core. tests/test_triton_compile.py fails on a compile
error, a spill, or shared memory over the target's limit. Usage: python scripts/triton_compile_report.py"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CYCLES = ("cycle6_flash", "cycle7_int8", "cycle8_graphs", "cycle9_chunked", "cycle10_speculative", "cycle11_tp")
# Shared memory a block may use (the opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK_SIZES = (16, 256)        # triton's default block size, and flash-attn's (a pool made for it)
INT8_ROWS = (1, 16, 17, 512)   # decode batches (<= 16: the small tile) and prefill; 16 | M or not


@dataclasses.dataclass(frozen=True)
class Model:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


QWEN3 = json.loads((ROOT / "common/configs/Qwen3-0.6B/config.json").read_text())
# SmolLM2-135M's from its config.json (HuggingFaceTB/SmolLM2-135M-Instruct): head_dim = 576 / 9.
MODELS = {"Qwen3-0.6B": Model(*(QWEN3[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "hidden_size", "intermediate_size"))),
          "SmolLM2-135M": Model(9, 3, 64, 576, 1536)}
# Head sizes that are not those two: one not a power of two (padded to 128), and the widest taken.
HEAD_SIZES = {"head_dim=80": Model(32, 8, 80, 2560, 6912), "head_dim=256": Model(8, 4, 256, 2048, 8192)}


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record(module, kernel_name: str, wrapper, *args) -> list:
    """Call `wrapper(*args)` with the module's `kernel_name` recorded; the launches it made."""
    recorder = Recorder(getattr(module, kernel_name))
    setattr(module, kernel_name, recorder)
    try:
        wrapper(*args)
    finally:
        setattr(module, kernel_name, recorder.kernel)
    return recorder.launches


meta = functools.partial(torch.empty, device="meta")   # a tensor with a shape and a dtype, and no data


def attention_launches(module, model: Model, dtype, block_size: int) -> list:
    """Both attention kernels as the engine launches them: q [tokens, heads, head_dim], a pool
    [blocks, block_size, kv_heads, head_dim], int32 block tables and lengths."""
    i32, batch, tokens = torch.int32, 8, 64
    cache = meta(64, block_size, model.kv_heads, model.head_dim, dtype=dtype)
    tables, lens = meta(batch, 16, dtype=i32), meta(batch, dtype=i32)
    scale = model.head_dim ** -0.5
    decode = record(module, "_decode_kernel", module.paged_decode_attention,
                    meta(batch, model.heads, model.head_dim, dtype=dtype), cache, cache, tables, lens, scale)
    prefill = record(module, "_prefill_kernel", module.paged_prefill_attention,
                     meta(tokens, model.heads, model.head_dim, dtype=dtype), cache, cache, tables,
                     meta(batch + 1, dtype=i32), lens, 16, scale)
    return decode + prefill


def int8_launches(module, model: Model, dtype, rows: int) -> list:
    """The int8 matmul on the model's q_proj (K = hidden) and down_proj (K = intermediate)."""
    launches = []
    for n, k in ((model.heads * model.head_dim, model.hidden), (model.hidden, model.intermediate)):
        launches += record(module, "_int8_matmul_kernel", module.int8_matmul, meta(rows, k, dtype=dtype),
                           meta(n, k, dtype=torch.int8), meta(n, dtype=torch.float32))
    return launches


def specialize(kernel, args, kwargs, capability: int):
    """What a launch with these arguments compiles on the target: Triton's own binder, as in
    JITFunction.run, built for the target instead of the (absent) current device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return target, options, signature, constexprs, attrs


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, read from the cubin by cuobjdump (ships with triton)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(found[1]), "spill_bytes": int(found[2]) + int(found[3])}


@dataclasses.dataclass(frozen=True)
class Config:
    """One engine configuration: the kernel file, and the shapes its wrappers are called with."""
    label: str          # "cycle model dtype what"
    path: str           # the kernel file
    kind: str           # "attention" or "int8"
    model: Model
    dtype: str
    size: int           # the KV block size (attention) or the activation rows M (int8)

    def launches(self, module) -> list:
        launches = attention_launches if self.kind == "attention" else int8_launches
        return launches(module, self.model, DTYPES[self.dtype], self.size)


def configurations(dtypes=("bf16", "fp16", "fp32"), rows=INT8_ROWS, attention=True, cycles=CYCLES) -> list[Config]:
    """Every configuration the engines run: both models, each dtype, both block sizes, and the
    int8 matmul (cycles 7 and 8) at decode and prefill row counts."""
    configs = []
    for cycle in cycles:
        attention_file, int8_file = ROOT / cycle / "triton_attention.py", ROOT / cycle / "triton_int8.py"
        for name, model in MODELS.items():
            for dtype in dtypes:
                if attention:
                    configs += [Config(f"{cycle} {name} {dtype} block_size={size}", str(attention_file),
                                       "attention", model, dtype, size) for size in BLOCK_SIZES]
                if int8_file.exists():
                    configs += [Config(f"{cycle} {name} {dtype} int8_M={m}", str(int8_file), "int8", model, dtype, m)
                                for m in rows]
    return configs


def head_size_configurations(dtypes=("bf16", "fp32"), cycle="cycle6_flash") -> list[Config]:
    """The attention kernels at the other head sizes, block size 16."""
    path = str(ROOT / cycle / "triton_attention.py")
    return [Config(f"{cycle} {name} {dtype} block_size=16", path, "attention", model, dtype, 16)
            for name, model in HEAD_SIZES.items() for dtype in dtypes]


@functools.lru_cache(maxsize=None)
def module_for(path: str):
    """The kernel file as a fresh module whose kernels compile (Triton's interpreter switched off
    while it is defined), once per process: the cycle's own module, which tests may have imported
    interpreted, is left alone; the name keeps copies (three cycles, a test's variant) apart."""
    from triton import knobs

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        spec = importlib.util.spec_from_file_location(f"compiled_{Path(path).stem}_{digest}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def specialization_key(kernel, args, kwargs, capability: int) -> tuple:
    """What tells two launches' compiled kernels apart: the kernel's source (with what it calls),
    the target, the signature, constexprs, attributes and options."""
    _, options, signature, constexprs, attrs = specialize(kernel, args, kwargs, capability)
    return (kernel.cache_key, capability, repr(signature), repr(constexprs), repr(attrs),
            options.num_warps, options.num_stages)


def compile_launch(task: tuple) -> dict:
    """Compile launch `index` of `config` for `capability` (run in a worker process)."""
    import triton
    from triton.compiler import ASTSource

    config, index, capability = task
    kernel, args, kwargs = config.launches(module_for(config.path))[index]
    target, options, signature, constexprs, attrs = specialize(kernel, args, kwargs, capability)
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as error:
        raise RuntimeError(f"{config.label}: {kernel.__name__} does not compile for sm_{capability}: "
                           f"{type(error).__name__}: {error}") from None
    return dict(kernel=kernel.__name__, sm=capability, num_warps=compiled.metadata.num_warps,
                num_stages=options.num_stages, shared=compiled.metadata.shared,
                constexprs={kernel.arg_names[i[0]]: v for i, v in constexprs.items()},
                compile_s=time.perf_counter() - start, **resource_usage(compiled.asm["cubin"]))


def compile_all(configs, capabilities=(80, 90), workers: int | None = None) -> list[tuple[str, dict]]:
    """Compile every launch of every configuration for every target, each distinct specialization
    once, over `workers` processes (default: one per core): [(label, result)]. A compile error
    raises, naming the configuration."""
    tasks, rows = {}, []
    for config in configs:
        for index, (kernel, args, kwargs) in enumerate(config.launches(module_for(config.path))):
            for capability in capabilities:
                key = specialization_key(kernel, args, kwargs, capability)
                tasks.setdefault(key, (config, index, capability))
                rows.append((config.label, key))
    # Compiled in fresh processes whose triton is imported with the interpreter off: one imported
    # under TRITON_INTERPRET=1 (a test run) holds triton's own library functions interpreted.
    interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers or os.cpu_count() or 1, len(tasks)),
                                                    mp_context=context) as pool:
            results = dict(zip(tasks, pool.map(compile_launch, tasks.values())))
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return [(label, results[key]) for label, key in rows]


def problems(rows) -> list[str]:
    """Shared memory over the target's limit, and spills."""
    found = []
    for label, r in rows:
        if r["shared"] > SHARED_LIMIT[r["sm"]]:
            found.append(f"{label}: {r['kernel']} sm_{r['sm']} needs {r['shared']} B of shared memory, "
                         f"over the {SHARED_LIMIT[r['sm']]} B limit")
        if r["spill_bytes"]:
            found.append(f"{label}: {r['kernel']} sm_{r['sm']} spills ({r['registers']} registers, "
                         f"{r['spill_bytes']} B of local memory per thread, num_warps={r['num_warps']})")
    return found


def table(rows) -> str:
    """One line per distinct compiled kernel: the cycles' identical copies and repeated shapes fold."""
    seen, lines = set(), []
    header = f"{'kernel':<20} {'model / shape':<26} {'dtype':<5} {'constexprs':<72} {'sm':>3} {'warps':>5} " \
             f"{'stages':>6} {'regs':>4} {'spill B':>7} {'smem KiB':>8}"
    for label, r in rows:
        cycle, model, dtype, *rest = label.split()
        what = f"{model} {' '.join(rest)}".replace("block_size=", "bs=")
        consts = " ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        key = (r["kernel"], model, dtype, consts, r["sm"], r["num_warps"], r["registers"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{r['kernel']:<20} {what:<26} {dtype:<5} {consts:<72} {r['sm']:>3} {r['num_warps']:>5} "
                     f"{r['num_stages']:>6} {r['registers']:>4} {r['spill_bytes']:>7} {r['shared'] / 1024:>8.1f}")
    return "\n".join([header] + lines)


def main() -> int:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    start = time.perf_counter()
    rows = compile_all(configurations() + head_size_configurations())
    distinct = {id(r): r for _, r in rows}.values()
    found = problems(rows)
    ptxas = re.search(r"release (\S+),", str(get_ptxas_version()))
    print(f"triton {triton.__version__}, ptxas {ptxas[1] if ptxas else '?'}, "
          f"torch {torch.__version__}; compiled on a CPU (no GPU), targets sm_80 (A100) and sm_90 (H100/H200)")
    print(f"{len(rows)} launches, {len(distinct)} distinct specializations, compiled in "
          f"{sum(r['compile_s'] for r in distinct):.0f} s of compile time over {os.cpu_count()} cores "
          f"({time.perf_counter() - start:.0f} s wall)")
    print("shared memory limit per block: sm_80 163 KiB, sm_90 227 KiB; spill B = local memory per thread\n")
    print(table(rows))
    print("\n" + ("\n".join(found) if found else "no spills, shared memory within every limit"))
    return 1 if found else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
