"""compare.py's verdicts and its per-workload table: which cycle is the reference, whether an engine
gives the same tokens, what the exit status is, and one line per engine that was not measured."""

from common.benchmark.online import format_online_table
from common.benchmark.tables import cell, format_columns
from common.benchmark.workloads import DESCRIPTIONS
from common.engine.memory import GIB
from common.engine.metrics import PEAK_WITH_LOADING

MIB = 2**20

# Exit status: 0 every engine was measured (engines that cannot run the workload at all are skipped
# by design and do not count); 1 an engine failed (a crash: something to fix); 3 none failed, but
# some timed out or were refused for memory: expected outcomes when asked for, yet rows are missing.
# Stopped by SIGTERM or SIGINT: 128 + the signal's number, as a shell reports it.
EXIT_OK, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 3


def cycle_number(engine: str) -> int | None:
    """cycle4_batching -> 4; an HF engine -> None."""
    prefix = engine.partition("_")[0]
    return int(prefix[len("cycle"):]) if prefix.startswith("cycle") and prefix[len("cycle"):].isdigit() else None


def failure_summary(failure: dict) -> str:
    """The one line the table's 'not measured' section shows for a failure."""
    if failure["kind"] == "timeout":
        return f"timed out after {failure['seconds']:g} s"
    if failure["kind"] == "out_of_memory":
        estimate = failure.get("estimate_bytes")
        return f"out of memory (est. {estimate / GIB:.1f} GiB)" if estimate else "out of memory"
    if failure["kind"] in ("skipped", "interrupted"):
        return f"{failure['kind']}: {failure['error']}"
    lines = failure["error"].splitlines()
    return f"failed ({lines[0]}): {lines[-1][:160]}" if len(lines) > 1 else f"failed: {lines[0]}"


def exit_status(failures: list[dict]) -> int:
    kinds = {f["kind"] for f in failures} - {"skipped"}
    if "error" in kinds:
        return EXIT_FAILED
    return EXIT_INCOMPLETE if kinds else EXIT_OK


def hf_dtype(results: list[dict], requested: str | None) -> str | None:
    """HF must run in the cycles' dtype to be comparable: take the reference cycle's."""
    if requested or not results:
        return requested
    return (reference_result(results) or results[0])["dtype"]


def is_exact(result: dict) -> bool:
    """A cycle without quantization computes what cycle 1 computes: in fp32 its greedy tokens must
    equal cycle 1's. int8 (cycle 7 on) and HF's own kernels are expected to differ."""
    return cycle_number(result["engine"]) is not None and not result.get("int8_path")


def reference_result(results: list[dict]) -> dict | None:
    """The lowest-numbered exact cycle that ran: cycle 1 when present."""
    exact = [r for r in results if is_exact(r)]
    return min(exact, key=lambda r: cycle_number(r["engine"]), default=None)


def token_agreement(token_ids: list[list[int]], reference: list[list[int]]) -> tuple[float, float | None]:
    """Share of requests whose tokens equal the reference's, and the mean index of the first
    differing token over the others (a sequence that stopped early differs where it ends)."""
    first_diffs = []
    for ours, theirs in zip(token_ids, reference):
        if ours != theirs:
            first_diffs.append(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                    min(len(ours), len(theirs))))
    share = 1 - len(first_diffs) / len(reference) if reference else 1.0
    return share, (sum(first_diffs) / len(first_diffs) if first_diffs else None)


def same_tokens(result: dict, reference: dict | None) -> dict:
    """The 'same tokens' verdict of one engine against the reference cycle.

    fp32 (engine and reference): exact cycles must match token for token: 'yes' or 'no', and 'no'
    is a bug. Otherwise (bf16/fp16, where kernels that add in another order may flip a near-tie,
    and int8 and HF in any dtype) the share of equal requests and the mean first difference."""
    if reference is None or len(result["token_ids"]) != len(reference["token_ids"]):
        return {"cell": "-", "reference": None}
    share, first_diff = token_agreement(result["token_ids"], reference["token_ids"])
    exact = is_exact(result) and result["dtype"] == reference["dtype"] == "float32"
    record = {"reference": reference["engine"], "exact_required": exact, "share": share, "first_diff_mean": first_diff}
    if exact:
        return record | {"cell": "yes" if share == 1 else "no"}
    if result is reference:
        return record | {"cell": "reference"}
    cell_text = f"{share:.0%}" + (f" (first diff @ {first_diff:.0f})" if first_diff is not None else "")
    return record | {"cell": cell_text}


def mark_same_tokens(results: list[dict]) -> dict | None:
    """Give every result its verdict against the reference cycle; return the reference."""
    reference = reference_result(results)
    for r in results:
        r["same_tokens"] = same_tokens(r, reference)
    return reference


def _peak_cell(result: dict) -> str:
    star = "*" if result.get("peak_memory_scope") == PEAK_WITH_LOADING else ""
    return cell(result["peak_memory_bytes"], MIB, "{:.0f}") + star


def format_table(results: list[dict], failures: list[dict] = ()) -> str:
    reference = next((r["same_tokens"]["reference"] for r in results if r.get("same_tokens", {}).get("reference")), None)
    header = ["engine", "mean latency s", "throughput tok/s", "mean TTFT s", "peak mem MiB",
              "KV peak MiB", "weights MiB", "weights", "attention", "int8",
              f"same tokens as c{cycle_number(reference) if reference else 1}"]
    rows = [[r["engine"], cell(r["latency_mean_s"]), cell(r["throughput_tok_s"], fmt="{:.1f}"),
             cell(r["ttft_mean_s"]), _peak_cell(r),
             cell(r["kv_cache_peak_bytes"], MIB, "{:.1f}"), cell(r["weight_bytes"], MIB, "{:.0f}"),
             r["weights"], r.get("attention_backend") or "-", r.get("int8_path") or "-",
             r.get("same_tokens", {}).get("cell", "-")] for r in results]
    lines = format_columns(header, rows)
    if any(r.get("peak_memory_scope") == PEAK_WITH_LOADING for r in results):
        lines.append("* peak memory includes model loading (it could not be reset after loading)")
    lines += format_failures(failures)
    return "\n".join(lines)


def format_failures(failures: list[dict]) -> list[str]:
    if not failures:
        return []
    names = [f["engine"] or "-" for f in failures]   # None: a signal came between two engines
    width = max(len(n) for n in names)
    return ["not measured:"] + [f"  {n.ljust(width)}  {failure_summary(f)}" for n, f in zip(names, failures)]


def format_part(record: dict, title: bool) -> str:
    """One workload's table: the online table for an online run, the engine table otherwise."""
    part, results = record["part"], record["results"]
    lines = []
    if title:
        size = f", {results[0]['workload_size']} size, {results[0]['num_requests']} requests" if results else ""
        lines.append(f"== {part['name']}: {DESCRIPTIONS[part['workload']]}{size}")
    if part["workload"] == "online" and results:
        lines += [format_online_table(results)] + format_failures(record["failures"])
    else:
        lines.append(format_table(results, record["failures"]))
    if part["note"]:
        lines.append(f"note: {part['note']}")
    return "\n".join(lines)
