"""The image's build check (k8s/Dockerfile): what the GPU pods need from the installed packages,
checked during `docker build`, where no GPU is attached.

- torch is a CUDA build (``torch.version.cuda``): PyPI's Linux x86_64 wheel is, and the image
  must not end up with a CPU-only one (another platform, another index);
- torch.distributed has NCCL (``torch.distributed.is_nccl_available()``), Ray Train's backend
  on GPUs;
- DeepSpeed's CUDA accelerator loads (``from deepspeed.accelerator import get_accelerator``)
  and communicates over NCCL. Without a GPU DeepSpeed's detection picks its CPU accelerator,
  so the check asks for the CUDA one by name (``DS_ACCELERATOR=cuda``): the one the pods detect.

Prints one line per check; exits 1 if any failed.
"""

from __future__ import annotations

import os
import sys


def checks() -> list[tuple[bool, str]]:
    """``(passed, what was found)`` for each check."""
    os.environ["DS_ACCELERATOR"] = "cuda"  # read at the first get_accelerator()

    import torch.cuda
    import torch.distributed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device, backend = accelerator.device_name(), accelerator.communication_backend_name()
    return [
        (torch.version.cuda is not None,
         f"torch {torch.__version__}: CUDA build: {torch.version.cuda or 'no (CPU only)'}"),
        (torch.distributed.is_nccl_available(),
         f"torch.distributed: NCCL available: {torch.distributed.is_nccl_available()}"),
        ((device, backend) == ("cuda", "nccl"),
         f"DeepSpeed accelerator: {device}, communication backend {backend}"),
    ]


def main() -> int:
    results = checks()
    for passed, found in results:
        print(f"{'ok    ' if passed else 'FAILED'} {found}")
    return 0 if all(passed for passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
