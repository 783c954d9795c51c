"""Deterministic kernels, so that on a GPU two runs of the same training give the same bits.

On a GPU the backward pass of several kernels sums in an order that changes from run to run
(atomic additions, split-K matrix products), so an unperturbed control child ends a small
distance from its parent: the *noise floor*. ``StabilityArguments.deterministic`` switches
PyTorch to deterministic algorithms (as the Trainer's ``full_determinism`` does, without its
``CUDA_LAUNCH_BLOCKING=1``, which only slows kernels down and changes no result), so that the
floor is zero on one GPU; benchmarks/determinism_cost.py measures what it costs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: cuBLAS workspace settings under which cuBLAS is deterministic (PyTorch's reproducibility notes).
DETERMINISTIC_CUBLAS_WORKSPACES = (":4096:8", ":16:8")


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic PyTorch kernels, cuBLAS workspace and cuDNN inside the block (nothing when
    ``enabled`` is False); the previous settings come back after it. Enter it before the first
    matrix product on a GPU (cuBLAS reads its workspace setting once); an operation with no
    deterministic implementation then raises PyTorch's own error naming it."""
    if not enabled:
        yield
        return
    environment = {name: os.environ.get(name) for name in ("CUBLAS_WORKSPACE_CONFIG", "FLASH_ATTENTION_DETERMINISTIC")}
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_CUBLAS_WORKSPACES:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = DETERMINISTIC_CUBLAS_WORKSPACES[0]
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    logger.info("Deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG=%s).", os.environ["CUBLAS_WORKSPACE_CONFIG"])
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def hardware_record(device: torch.device | str) -> dict[str, Any]:
    """Where and how a run computed: the noise floor depends on both, so the run records them."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "device": name,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "tf32_matmul": _tf32_matmul() if device.type == "cuda" else None,
    }


def _tf32_matmul() -> bool:
    """Whether float32 matrix products may use TF32. TrainingArguments(tf32=...) sets it through
    torch's newer ``fp32_precision`` API, after which reading the legacy ``allow_tf32`` raises."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", None) == "tf32"
