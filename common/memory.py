"""Byte counts of what a model holds."""

from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers, a tied tensor counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + [b for _, b in model.named_buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total
