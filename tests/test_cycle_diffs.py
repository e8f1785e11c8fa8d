"""Each `diff -ruN cycleN cycleN+1` is its lesson and nothing else.

ALLOWED lists, for every pair of consecutive cycles, the files the diff may touch and, for a file
both cycles have, the symbols it may touch: a top-level function or class, a method (`Class.method`),
a class's own lines (`Class`: its docstring and fields), a module-level name (`DEFAULTS`), and
`<docstring>`, `<imports>` and `<module>` (any other top-level statement). A comment belongs to
the code below it. The test computes the real diff of the two trees (difflib over the lines, ast
to name what each changed line belongs to) and names every file or symbol the list does not have.
A change that belongs to a lesson goes into its list here, and into the guide's chapter; a change
that does not belongs in another cycle, or in common/.

The same file holds the shape every cycle shares: run.py, serve.py and __init__.py are the same
bytes in every cycle, no file outside common/ (tests aside) is over 300 lines and no function over 60.
"""

import ast
import difflib
import shutil
from pathlib import Path

import pytest

from conftest import CYCLES

ROOT = Path(__file__).resolve().parent.parent
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60
# Cycle 11's run.py and serve.py also hand torchrun's ranks > 0 to the worker loop (its lesson).
TORCHRUN_ENTRY_POINTS = ("cycle11_tp",)
_SAME_ENTRY = [c for c in CYCLES if c not in TORCHRUN_ENTRY_POINTS]
IDENTICAL = {"run.py": _SAME_ENTRY, "__init__.py": CYCLES, "serve.py": _SAME_ENTRY[3:]}   # serve.py from cycle 4 on
NEW = "new file"

ALLOWED = {
    # 1 -> 2, the KV cache: one contiguous buffer per static group; prefill once, then decode.
    ("cycle1_naive", "cycle2_kvcache"): {
        "kv_cache.py": NEW,
        # the group reserves and frees its buffer; a step is prefill or decode; the peak is the reservation
        "llm.py": {"<docstring>", "LLM._check_memory", "LLM._run_group", "LLM._stats", "LLM.generate"},
        # attention reads K/V from the cache instead of recomputing it
        "model.py": {"<docstring>", "Attention.forward", "CausalLM.forward", "DecoderLayer.forward"},
        # the runner owns the buffer and builds prefill and decode inputs; a finished sequence's
        # row leaves the buffer (_keep_rows): with no cache it simply was not fed again
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._keep_rows",
                            "ModelRunner._prepare", "ModelRunner._prepare_decode", "ModelRunner._prepare_prefill",
                            "ModelRunner.allocate_kv_cache", "ModelRunner.free_kv_cache", "ModelRunner.run"},
    },
    # 2 -> 3, paging: a pool of blocks sized at start-up, block tables, slot mapping.
    ("cycle2_kvcache", "cycle3_paged"): {
        "block_manager.py": NEW,
        # the pool's size options (num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization)
        "config.py": {"<imports>", "Config", "Config.__post_init__", "DEFAULTS"},
        # the contiguous buffer becomes the paged pool, planned from a profiled step; a finished
        # sequence's blocks go back to the pool, so no rows are moved up (keep_rows) any more
        "kv_cache.py": {"<docstring>", "<imports>", "CPU_KV_CACHE_BYTES", "ContiguousKVCache",
                        "ContiguousKVCache.__init__", "ContiguousKVCache.keep_rows", "GPU_MEMORY_UTILIZATION",
                        "PagedKVCache", "PagedKVCache.__init__", "block_bytes", "plan_kv_pool",
                        "profile_activation_peak", "profile_batches"},
        # groups sized by the pool (refused by check_fits, not by an estimate); blocks taken per
        # token and freed at finish; the peak is the blocks held, not a reservation
        "llm.py": {"<docstring>", "<imports>", "LLM.__init__", "LLM._check_memory", "LLM._groups",
                   "LLM._postprocess", "LLM._run_group", "LLM._stats", "LLM._track_peak", "LLM.generate"},
        # K/V stored by slot_mapping, read through block tables
        "model.py": {"<docstring>", "<imports>", "Attention.forward", "AttentionMetadata", "CausalLM.forward",
                     "DecoderLayer.forward", "gather_blocks", "store_kv"},
        # the runner sizes (profiles) the pool and builds slot mappings and block tables; no cache
        # rows to drop (_keep_rows): a finished sequence's blocks are freed by the BlockManager
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._keep_rows",
                            "ModelRunner._kv_cache", "ModelRunner._metadata", "ModelRunner._plan_kv_pool",
                            "ModelRunner._prepare_decode", "ModelRunner._prepare_prefill", "ModelRunner._profile_run",
                            "ModelRunner._slot", "ModelRunner.allocate_kv_cache", "ModelRunner.free_kv_cache",
                            "ModelRunner.run", "ModelRunner.stats"},
        # a sequence's block table, and the most tokens it can ever store
        "sequence.py": {"Sequence.__init__", "Sequence.max_len"},
    },
    # 3 -> 4, continuous batching: the Scheduler (owning the BlockManager), flat batches, the loop.
    ("cycle3_paged", "cycle4_batching"): {
        # the token budget of one step (max_num_batched_tokens), and --trace of each step
        "config.py": {"Config", "Config.__post_init__", "DEFAULTS"},
        # static groups give way to the engine loop: add_request, step, abort_request, load
        "llm.py": {"<docstring>", "<imports>", "LLM.__init__", "LLM._add", "LLM._groups", "LLM._postprocess",
                   "LLM._prepare", "LLM._run_group", "LLM._stats", "LLM._track_peak", "LLM.abort_request",
                   "LLM.add_request", "LLM.describe", "LLM.generate", "LLM.has_unfinished_requests",
                   "LLM.load", "LLM.step"},
        # one flat batch of prefill and decode tokens, no padding
        "model.py": {"<docstring>", "Attention.forward", "AttentionMetadata", "CausalLM.forward", "store_kv"},
        "model_runner.py": {"<docstring>", "ModelRunner._layout", "ModelRunner._metadata", "ModelRunner._prepare",
                            "ModelRunner._prepare_decode", "ModelRunner._prepare_prefill",
                            "ModelRunner._profile_run", "ModelRunner._slot", "ModelRunner.run"},
        "scheduler.py": NEW,
        "serve.py": NEW,   # a server needs a loop that takes requests while others run
    },
    # 4 -> 5, prefix caching: hash-chained blocks with ref counts; admission reuses cached blocks.
    ("cycle4_batching", "cycle5_prefix"): {
        "block_manager.py": {"<docstring>", "<imports>", "Block", "Block.__init__", "BlockManager.__init__",
                             "BlockManager._take_free_block", "BlockManager.allocate",
                             "BlockManager.append_slot", "BlockManager.cache_full_blocks",
                             "BlockManager.cached_blocks", "BlockManager.can_allocate", "BlockManager.free",
                             "BlockManager.needs_block", "BlockManager.prompt_block_hashes",
                             "BlockManager.stats", "chain_hash"},
        "config.py": {"Config"},                        # enable_prefix_caching
        "llm.py": {"<docstring>"},                      # the chapter's title
        "model_runner.py": {"ModelRunner._prepare"},    # a prefill starts after its cached tokens
        # admission counts only uncached tokens; blocks are hashed once computed (postprocess)
        "scheduler.py": {"<docstring>", "Scheduler.__init__", "Scheduler._admit", "Scheduler.describe",
                         "Scheduler.postprocess", "Scheduler.reset_stats", "Scheduler.stats"},
        "sequence.py": {"Sequence.__init__"},           # its block hashes and cached tokens
    },
    # 5 -> 6, fused attention: the backends, chosen in Config, and the layout each needs.
    ("cycle5_prefix", "cycle6_flash"): {
        "attention.py": NEW,
        "config.py": {"<imports>", "Config", "Config.__post_init__"},   # attention_backend
        "model.py": {"<docstring>", "<imports>", "Attention.__init__", "Attention.forward",
                     "AttentionMetadata", "Backbone.__init__", "CausalLM.__init__", "DecoderLayer.__init__",
                     "gather_blocks", "grouped_attention"},
        "model_runner.py": {"<imports>", "ModelRunner.__init__", "ModelRunner._dense_layout",
                            "ModelRunner._layout", "ModelRunner._prepare", "ModelRunner.run",
                            "ModelRunner.stats", "build_model", "say_fallbacks"},
        "triton_attention.py": NEW,
    },
    # 6 -> 7, int8 weight-only quantization: the runner quantizes after loading; our int8 kernel.
    ("cycle6_flash", "cycle7_int8"): {
        "config.py": {"<imports>", "Config", "Config.__post_init__"},   # quantization, int8_matmul
        "llm.py": {"<docstring>"},                                      # the chapter's title
        "model_runner.py": {"<imports>", "ModelRunner.__init__", "ModelRunner._quantize",
                            "ModelRunner.stats"},
        "quantization.py": NEW,
        "triton_int8.py": NEW,
    },
    # 7 -> 8, CUDA graphs: the runner captures one graph per batch-size bucket and replays decode
    # steps through static buffers; the compiled small ops (a flag) in model.py and compiled_ops.py.
    ("cycle7_int8", "cycle8_graphs"): {
        "compiled_ops.py": NEW,
        "config.py": {"Config", "Config.__post_init__"},                # enforce_eager, compile
        "cuda_graphs.py": NEW,
        "model.py": {"Attention.__init__", "Attention.forward", "MLP.__init__", "MLP.forward",
                     "RMSNorm.__init__", "RMSNorm.forward", "rms_norm", "silu_mul"},
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._layout",
                            "ModelRunner._prepare", "ModelRunner._to_device", "ModelRunner.run",
                            "ModelRunner.stats"},
    },
    # Chunked prefill: every step spends one token budget, decodes first, prompts in chunks.
    ("cycle8_graphs", "cycle9_chunked"): {
        "attention.py": {"<docstring>", "dense_attention", "sdpa_attention",   # a mixed step: one-query
                         "triton_paged_attention"},                             # rows apart
        "block_manager.py": {"<docstring>", "BlockManager.allocate", "BlockManager.append_slot",   # blocks
                             "BlockManager.blocks_needed", "BlockManager.can_allocate",            # per chunk
                             "BlockManager.can_append", "BlockManager.free", "BlockManager.needs_block"},
        "config.py": {"Config", "Config.__post_init__"},   # enable_chunked_prefill, long_prefill_token_threshold
        "llm.py": {"<docstring>", "LLM._prepare", "LLM.step"},   # token counts per step; long prompts accepted
        "model.py": {"AttentionMetadata"},                   # num_decodes
        "model_runner.py": {"<docstring>", "ModelRunner._layout", "ModelRunner._prepare",   # tokens from
                            "ModelRunner._profile_run", "ModelRunner.run"},   # num_computed_tokens; sampling rows
        "scheduler.py": {"<docstring>", "<imports>", "Scheduler.__init__", "Scheduler._admit", "Scheduler._chunk",
                         "Scheduler._decode", "Scheduler._in_prompt", "Scheduler._schedule_running",   # the budget
                         "Scheduler._schedule_waiting", "Scheduler._track_peak", "Scheduler.add",
                         "Scheduler.describe", "Scheduler.postprocess", "Scheduler.schedule"},
        "sequence.py": {"Sequence.__init__"},                # num_computed_tokens
    },
    # Speculative decoding: n-gram drafts verified as rows of 1 + k in the mixed step, exact rejection sampling.
    ("cycle9_chunked", "cycle10_speculative"): {
        "block_manager.py": {"BlockManager.trim"},          # blocks taken only for rejected drafts go back
        "config.py": {"Config", "Config.__post_init__",     # speculative_config, vLLM's dict, checked
                      "SPECULATIVE_KEYS", "check_speculative_config"},
        "llm.py": {"LLM.describe"},                         # the engine reports its speculative_config
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__",   # drafts are inputs; logits
                            "ModelRunner._prepare", "ModelRunner.run"},            # of all k + 1 rows
        "output_processor.py": {"OutputProcessor._finished", "OutputProcessor.process"},   # several tokens a step
        "proposer.py": NEW,                                 # the n-gram proposer and its adaptive draft length
        "rejection_sampler.py": NEW,                        # which drafts to keep, the distribution exact
        "sampler.py": {"SamplerOutput"},                    # accepted_token_ids beside each sampled token
        "scheduler.py": {"<docstring>", "<imports>", "Scheduler.__init__",        # drafts under the budget,
                         "Scheduler._in_prompt", "Scheduler._propose",            # rollback after the step,
                         "Scheduler._schedule_running", "Scheduler._verified",    # and vLLM's counters;
                         "Scheduler.describe", "Scheduler.postprocess",           # --trace shows id+drafts
                         "Scheduler.reset_stats", "Scheduler.spec_stats", "Scheduler.stats"},
        "sequence.py": {"Sequence.__init__"},               # spec_token_ids, the adaptive draft length
    },
    # Tensor parallelism: every weight split over the ranks, one all-reduce per sublayer; rank 0
    # schedules and samples, the other ranks run the same steps.
    ("cycle10_speculative", "cycle11_tp"): {
        "config.py": {"Config", "Config.__post_init__"},     # tensor_parallel_size, checked
        "executor.py": NEW,                                 # rank 0: start the workers, send steps, stop them
        "llm.py": {"<docstring>", "<imports>", "LLM.__init__",   # heads checked, the executor started,
                   "LLM.describe", "LLM.generate", "LLM.register_failure_callback",   # counters per run; a
                   "LLM.shutdown"},                                  # dead worker reported; shutdown()
        "model.py": {"<docstring>", "<imports>", "Attention.__init__", "Attention.forward",   # this rank's
                     "Backbone.__init__", "CausalLM.__init__", "CausalLM.checkpoint_targets",  # heads and
                     "CausalLM.compute_logits", "DecoderLayer.__init__", "MLP", "MLP.__init__",  # channels;
                     "MLP.forward"},                                                          # vocab split
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._layout",
                            "ModelRunner._logits", "ModelRunner._prepare", "ModelRunner._profile_run",  # a step
                            "ModelRunner._tensors", "ModelRunner.execute", "ModelRunner.run",   # as lists sent
                            "ModelRunner.stats", "StepInputs", "build_model", "step_inputs"},   # to every rank
        "parallel_layers.py": NEW,                          # row-parallel, vocab-parallel layers; Shard
        "parallel_state.py": NEW,                           # the group, its collectives, the step channel
        "quantization.py": {"<imports>", "quantize_absmax", "quantize_model"},   # row-parallel scales whole
        "run.py": {"<docstring>", "<imports>", "<module>"},     # torchrun's ranks > 0 serve steps
        "serve.py": {"<docstring>", "<imports>", "<module>"},
        "worker.py": NEW,                                   # ranks > 0: build the slice, run every step
    },
}


# --- what a diff touches ------------------------------------------------------------------------

def _statement_symbol(node: ast.stmt, is_first: bool) -> str:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return "<imports>"
    if is_first and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
            and isinstance(node.value.value, str):
        return "<docstring>"
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    return names[0] if names else "<module>"


def line_owners(source: str) -> list[str | None]:
    """For every line of a module, the symbol it belongs to (None: a blank line)."""
    lines = source.splitlines()
    owners: list[str | None] = ["<module>"] * len(lines)

    def mark(node, name):
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        owners[first - 1:node.end_lineno] = [name] * (node.end_lineno - first + 1)

    for index, node in enumerate(ast.parse(source).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mark(node, node.name)
        elif isinstance(node, ast.ClassDef):
            mark(node, node.name)
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    mark(sub, f"{node.name}.{sub.name}")
        else:
            mark(node, _statement_symbol(node, index == 0))
    following = None                                   # a comment belongs to the code below it
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].strip()
        if not text:
            owners[i] = None
        elif text.startswith("#") and following is not None:
            owners[i] = following
        else:
            following = owners[i]
    return owners


def _slid(lines: list[str], owners: list, start: int, end: int) -> set:
    """The owners of an inserted (or deleted) run of lines. When the run can slide, as diff's runs
    can (a method added above another repeats its `@property`), the position that touches the
    fewest symbols counts."""
    while start > 0 and lines[start - 1] == lines[end - 1]:
        start, end = start - 1, end - 1
    choices = []
    while True:
        choices.append(set(owners[start:end]) - {None})
        if end >= len(lines) or lines[start] != lines[end]:
            return min(choices, key=len)
        start, end = start + 1, end + 1


def touched_symbols(old: str, new: str) -> set[str]:
    """The symbols of either side that a line-by-line diff of the two modules changes."""
    old_lines, new_lines = old.splitlines(), new.splitlines()
    old_owners, new_owners = line_owners(old), line_owners(new)
    touched = set()
    matcher = difflib.SequenceMatcher(None, old_lines, new_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "insert":
            touched |= _slid(new_lines, new_owners, j1, j2)
        elif tag == "delete":
            touched |= _slid(old_lines, old_owners, i1, i2)
        elif tag == "replace":
            touched |= set(old_owners[i1:i2]) | set(new_owners[j1:j2])
    return touched - {None}


def _files(tree: Path) -> dict[str, bytes]:
    return {p.relative_to(tree).as_posix(): p.read_bytes() for p in sorted(tree.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def diff_touches(old_tree: Path, new_tree: Path) -> dict[str, object]:
    """{file: NEW, "removed file" or the set of symbols touched} for every file that differs."""
    old, new = _files(old_tree), _files(new_tree)
    touched: dict[str, object] = {}
    for name in sorted(old.keys() | new.keys()):
        if name not in old:
            touched[name] = NEW
        elif name not in new:
            touched[name] = "removed file"
        elif old[name] != new[name]:
            if name.endswith(".py"):
                touched[name] = touched_symbols(old[name].decode(), new[name].decode())
            else:
                touched[name] = {"<file>"}
    return touched


def unexpected(touched: dict[str, object], allowed: dict[str, object]) -> list[str]:
    problems = []
    for name, what in touched.items():
        if name not in allowed:
            problems.append(f"{name}: the diff touches this file ({what if isinstance(what, str) else sorted(what)})")
        elif isinstance(what, str) or isinstance(allowed[name], str):
            if what != allowed[name]:
                problems.append(f"{name}: {what}, the list says {allowed[name]}")
        else:
            problems += [f"{name}: {symbol}" for symbol in sorted(what - allowed[name])]
    return problems


# --- the tests ----------------------------------------------------------------------------------

PAIRS = list(zip(CYCLES, CYCLES[1:]))


def test_every_pair_of_cycles_has_a_list():
    assert sorted(ALLOWED) == sorted(PAIRS)


@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{a[5]}to{b[5]}" for a, b in PAIRS])
def test_diff_touches_only_its_lesson(old, new):
    problems = unexpected(diff_touches(ROOT / old, ROOT / new), ALLOWED.get((old, new), {}))
    assert not problems, (f"diff -ruN {old} {new} touches what its lesson does not list (move the change "
                          f"where it belongs, or add it to ALLOWED and the guide):\n  " + "\n  ".join(problems))


def test_the_checker_catches_an_edited_function(tmp_path):
    """A copy of cycle 2 with one function of model.py edited and one comment added to llm.py's
    _postprocess: the checker names exactly those, and nothing else."""
    old, new = tmp_path / "cycle1_naive", tmp_path / "cycle2_kvcache"
    shutil.copytree(ROOT / "cycle1_naive", old, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "cycle2_kvcache", new, ignore=shutil.ignore_patterns("__pycache__"))
    allowed = ALLOWED[("cycle1_naive", "cycle2_kvcache")]
    assert unexpected(diff_touches(old, new), allowed) == []
    model = (new / "model.py").read_text()
    assert "def apply_rotary(" in model
    (new / "model.py").write_text(model.replace("    half = x.shape[-1] // 2\n", "    half = x.shape[-1] >> 1\n"))
    llm = (new / "llm.py").read_text()
    assert "        finished = []\n" in llm
    (new / "llm.py").write_text(llm.replace("        finished = []\n", "        finished = []   # none yet\n", 1))
    (new / "notes.txt").write_text("a file no lesson lists\n")
    assert sorted(unexpected(diff_touches(old, new), allowed)) == [
        "llm.py: LLM._postprocess", "model.py: apply_rotary", f"notes.txt: the diff touches this file ({NEW})"]


def test_line_owners_name_methods_fields_and_comments():
    source = ('"""doc"""\n\nimport os\n\nLIMIT = 3\n\n\nclass A:\n    x: int = 1\n\n    # about f\n'
              '    def f(self):\n        return 1\n\n\n@dec\ndef g():\n    pass\n')
    owners = line_owners(source)
    assert owners == ["<docstring>", None, "<imports>", None, "LIMIT", None, None, "A", "A", None, "A.f",
                      "A.f", "A.f", None, None, "g", "g", "g"]


@pytest.mark.parametrize("name", sorted(IDENTICAL))
def test_shared_entry_points_are_the_same_bytes_in_every_cycle(name):
    cycles = IDENTICAL[name]
    versions = {c: (ROOT / c / name).read_bytes() for c in cycles}
    first = versions[cycles[0]]
    assert all(v == first for v in versions.values()), \
        f"{name} differs between cycles: " + ", ".join(c for c, v in versions.items() if v != first)
    assert all(not (ROOT / c / name).exists() for c in CYCLES if c not in cycles + list(TORCHRUN_ENTRY_POINTS))


def _sources(include_common: bool) -> list[Path]:
    paths = [*ROOT.glob("cycle*/*.py"), ROOT / "compare.py", *ROOT.glob("scripts/*.py")]
    return sorted(paths + (list(ROOT.glob("common/**/*.py")) if include_common else []))


def test_no_file_outside_common_is_over_300_lines():
    """The cycles, compare.py and scripts/ (tests are not held to it)."""
    long = {str(p.relative_to(ROOT)): n for p in _sources(include_common=False)
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"over {MAX_FILE_LINES} lines: {long}"


def test_no_function_is_over_60_lines():
    """Every function and method of the cycles, common/, compare.py and scripts/, decorators included."""
    long = {}
    for path in _sources(include_common=True):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert not long, f"over {MAX_FUNCTION_LINES} lines: {long}"
