"""Device and dtype defaults shared by every cycle: cuda + bf16 when there is a GPU, cpu + fp32 otherwise."""

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` means the fastest device present; an explicit cuda request without a GPU is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device}: use cpu, cuda or mps")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA (what Qwen3 was trained in), fp32 elsewhere (CPU bf16 matmuls are slow and inexact)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def default_model(device: torch.device) -> str:
    """The course targets Qwen3-0.6B on a GPU; on a CPU the 135M SmolLM2 keeps runs in seconds."""
    return "Qwen/Qwen3-0.6B" if device.type == "cuda" else "HuggingFaceTB/SmolLM2-135M-Instruct"
