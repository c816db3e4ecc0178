"""Mixed precision as training does it: fp32 weights, the model's forward under bf16 autocast.

Why autocast, not DeepSpeed's ``bf16`` block: that block casts the weights to bf16 but neither the
inputs nor the buffers (BatchNorm statistics), so the first layer fails on mixed dtypes; it also
sums gradients across ranks in bf16 and leaves bf16-rounded weights to export. Under autocast the
weights stay fp32 masters (so gradients are reduced and exports saved in fp32) while matmuls and
convolutions run in bf16; the loss then runs in fp32 on the model's ``.float()`` output.
"""

from __future__ import annotations

import torch


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """The model's forward context on ``device``: bf16 autocast for ``bf16``, a no-op for ``fp32``
    (``train.precision``)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
