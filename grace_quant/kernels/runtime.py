"""Where the Triton kernels can run: CUDA tensors, or any tensor under Triton's CPU interpreter.

One rule for every kernel module and every caller that chooses between a Triton path and a torch path.
"""

from __future__ import annotations

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET`` set to anything but ``0``)."""
    return os.environ.get(INTERPRET_ENV, "0") not in ("", "0")


def kernels_can_run(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``tensor``: it lives on CUDA, or the interpreter is on."""
    return tensor.is_cuda or interpreting()
