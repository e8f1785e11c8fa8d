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
IDENTICAL = {"run.py": CYCLES, "__init__.py": CYCLES, "serve.py": CYCLES[3:]}   # serve.py from cycle 4 on
NEW = "new file"

ALLOWED = {
    # The cache: the runner reserves it per static group and splits a step into prefill and decode.
    ("cycle1_naive", "cycle2_kvcache"): {
        "kv_cache.py": NEW,
        "llm.py": {"<docstring>", "LLM._check_memory", "LLM._run_group", "LLM._stats", "LLM.generate"},
        "model.py": {"<docstring>", "Attention.forward", "CausalLM.forward", "DecoderLayer.forward"},
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._prepare",
                            "ModelRunner._prepare_decode", "ModelRunner._prepare_prefill",
                            "ModelRunner.allocate_kv_cache", "ModelRunner.free_kv_cache", "ModelRunner.run"},
    },
    # Paging: the block pool (sized and profiled by the runner), block tables, slot mapping.
    ("cycle2_kvcache", "cycle3_paged"): {
        "block_manager.py": NEW,
        "config.py": {"<imports>", "Config", "Config.__post_init__", "DEFAULTS"},
        "kv_cache.py": {"<docstring>", "<imports>", "CPU_KV_CACHE_BYTES", "ContiguousKVCache",
                        "ContiguousKVCache.__init__", "GPU_MEMORY_UTILIZATION", "PagedKVCache",
                        "PagedKVCache.__init__", "block_bytes", "plan_kv_pool", "profile_activation_peak",
                        "profile_batches"},
        "llm.py": {"<docstring>", "<imports>", "LLM.__init__", "LLM._check_memory", "LLM._groups",
                   "LLM._postprocess", "LLM._run_group", "LLM._stats", "LLM._track_peak", "LLM.generate"},
        "model.py": {"<docstring>", "<imports>", "Attention.forward", "AttentionMetadata", "CausalLM.forward",
                     "DecoderLayer.forward", "gather_blocks", "store_kv"},
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__", "ModelRunner._kv_cache",
                            "ModelRunner._metadata", "ModelRunner._plan_kv_pool", "ModelRunner._prepare_decode",
                            "ModelRunner._prepare_prefill", "ModelRunner._profile_run", "ModelRunner._slot",
                            "ModelRunner.allocate_kv_cache", "ModelRunner.free_kv_cache", "ModelRunner.run",
                            "ModelRunner.stats"},
        "sequence.py": {"Sequence.__init__", "Sequence.max_len"},
    },
    # Continuous batching: the scheduler, the flat batch, the engine loop (add_request, step,
    # abort_request) and its streaming hooks (stop strings, delta_text), serve.py.
    ("cycle3_paged", "cycle4_batching"): {
        "config.py": {"Config", "Config.__post_init__", "DEFAULTS"},
        "llm.py": {"<docstring>", "<imports>", "LLM.__init__", "LLM._add", "LLM._groups", "LLM._output",
                   "LLM._postprocess", "LLM._reset_counters", "LLM._run_group", "LLM._stats", "LLM._track_peak",
                   "LLM.abort_request", "LLM.add_request", "LLM.generate", "LLM.has_unfinished_requests",
                   "LLM.step"},
        "model.py": {"<docstring>", "Attention.forward", "AttentionMetadata", "CausalLM.forward", "store_kv"},
        "model_runner.py": {"<docstring>", "ModelRunner._layout", "ModelRunner._metadata", "ModelRunner._prepare",
                            "ModelRunner._prepare_decode", "ModelRunner._prepare_prefill",
                            "ModelRunner._profile_run", "ModelRunner._slot", "ModelRunner.run"},
        "sampling_params.py": {"<imports>", "SamplingParams", "SamplingParams.__post_init__"},
        "scheduler.py": NEW,
        "sequence.py": {"Sequence.__init__"},
        "serve.py": NEW,
    },
    # Prefix caching: hash-chained blocks with ref counts in the BlockManager; the scheduler admits
    # a prompt's cached blocks; the runner starts a prefill after them.
    ("cycle4_batching", "cycle5_prefix"): {
        "block_manager.py": {"<docstring>", "<imports>", "Block", "Block.__init__", "BlockManager.__init__",
                             "BlockManager._take_free_block", "BlockManager.allocate",
                             "BlockManager.append_slot", "BlockManager.cache_full_blocks",
                             "BlockManager.cached_blocks", "BlockManager.can_allocate", "BlockManager.free",
                             "BlockManager.needs_block", "BlockManager.prompt_block_hashes",
                             "BlockManager.stats", "chain_hash"},
        "config.py": {"Config"},
        "llm.py": {"<docstring>", "LLM.__init__", "LLM._postprocess"},
        "model_runner.py": {"ModelRunner._prepare"},
        "scheduler.py": {"<docstring>", "Scheduler._admit", "Scheduler.describe", "Scheduler.reset_stats",
                         "Scheduler.stats"},
        "sequence.py": {"Sequence.__init__"},
    },
    # Fused attention: the backends (attention.py, triton_attention.py), chosen in Config, and the
    # layout each needs.
    ("cycle5_prefix", "cycle6_flash"): {
        "attention.py": NEW,
        "config.py": {"<imports>", "Config", "Config.__post_init__", "Config.fit_head_dim",
                      "Config._choose_backend"},
        "llm.py": {"<imports>", "LLM.__init__"},   # the backend must take the model's head size
        "model.py": {"<docstring>", "<imports>", "Attention.__init__", "Attention.forward",
                     "AttentionMetadata", "Backbone.__init__", "CausalLM.__init__", "DecoderLayer.__init__",
                     "gather_blocks", "grouped_attention"},
        "model_runner.py": {"<imports>", "ModelRunner.__init__", "ModelRunner._dense_layout",
                            "ModelRunner._layout", "ModelRunner._prepare", "ModelRunner.run",
                            "ModelRunner.stats", "build_model"},
        "triton_attention.py": NEW,
    },
    # int8 weight-only quantization: the runner quantizes after loading; our int8 matmul kernel.
    ("cycle6_flash", "cycle7_int8"): {
        "config.py": {"<imports>", "Config", "Config.__post_init__"},
        "llm.py": {"<docstring>"},
        "model_runner.py": {"<imports>", "ModelRunner.__init__", "ModelRunner._quantize",
                            "ModelRunner.stats"},
        "quantization.py": NEW,
        "triton_int8.py": NEW,
    },
    # CUDA graphs: the runner measures, holds, sizes and captures; decode rows follow the
    # BlockManager; the compiled small ops (a flag) in model.py and compiled_ops.py.
    ("cycle7_int8", "cycle8_graphs"): {
        "block_manager.py": {"BlockManager.__init__", "BlockManager.allocate", "BlockManager.append_slot",
                             "BlockManager.free"},
        "compiled_ops.py": NEW,
        "config.py": {"Config", "Config.__post_init__"},
        "cuda_graphs.py": NEW,
        "kv_cache.py": {"<imports>", "held"},
        "llm.py": {"<docstring>", "LLM.__init__"},
        "model.py": {"Attention.__init__", "Attention.forward", "MLP.__init__", "MLP.forward",
                     "RMSNorm.__init__", "RMSNorm.forward", "rms_norm", "silu_mul"},
        "model_runner.py": {"<docstring>", "<imports>", "ModelRunner.__init__",
                            "ModelRunner._blocks_with_scratch", "ModelRunner._profile_run",
                            "ModelRunner.follow", "ModelRunner.run", "ModelRunner.stats"},
        "sampler.py": {"Sampler.__call__", "Sampler.sample"},
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
    """A copy of cycle 2 with one function of model.py edited and one line added to llm.py's
    _finish_reason: the checker names exactly those, and nothing else."""
    old, new = tmp_path / "cycle1_naive", tmp_path / "cycle2_kvcache"
    shutil.copytree(ROOT / "cycle1_naive", old, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "cycle2_kvcache", new, ignore=shutil.ignore_patterns("__pycache__"))
    allowed = ALLOWED[("cycle1_naive", "cycle2_kvcache")]
    assert unexpected(diff_touches(old, new), allowed) == []
    model = (new / "model.py").read_text()
    assert "def apply_rotary(" in model
    (new / "model.py").write_text(model.replace("    half = x.shape[-1] // 2\n", "    half = x.shape[-1] >> 1\n"))
    llm = (new / "llm.py").read_text()
    (new / "llm.py").write_text(llm.replace('            return "stop"\n', '            return "stop"  # EOS\n', 1))
    (new / "notes.txt").write_text("a file no lesson lists\n")
    assert sorted(unexpected(diff_touches(old, new), allowed)) == [
        "llm.py: LLM._finish_reason", "model.py: apply_rotary", f"notes.txt: the diff touches this file ({NEW})"]


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
    assert all(not (ROOT / c / name).exists() for c in CYCLES if c not in cycles)


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
