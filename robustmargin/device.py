"""The arithmetic and determinism of CUDA work, set in one place for every stage.

PyTorch's CUDA defaults run cuDNN convolutions in TF32 (a 10-bit mantissa) and let cuDNN pick
non-deterministic algorithms by timing. Late in training that is enough to sway the accept/roll-back
test, q_min and β, so every stage that works on a CUDA device calls `configure` first: IEEE float32
convolutions and matmuls (float64 work is IEEE anyway) unless TF32 is allowed, and deterministic kernels
unless declined. On the CPU nothing is changed: its kernels are IEEE and deterministic already."""
from __future__ import annotations

import os

import torch

from robustmargin.errors import UserError

# cuBLAS is reproducible only with a fixed workspace; either value below does it (:4096:8 is the default
# size on recent GPUs, so setting it costs no memory there)
CUBLAS_WORKSPACE = ":4096:8"
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


def configure(device: torch.device | str, *, deterministic: bool = True, tf32: bool = False) -> None:
    """Set the process's CUDA arithmetic for work on `device`: IEEE float32 (or TF32 when `tf32`) in
    cuDNN convolutions and cuBLAS matmuls; with `deterministic`, deterministic cuDNN algorithms and
    torch.use_deterministic_algorithms(True). A no-op unless `device` is a CUDA device."""
    if torch.device(device).type != "cuda":
        return
    # both the legacy flags and the per-operator precisions, so that either API reads back the same
    # (torch refuses to read the legacy cuDNN flag when the two disagree)
    precision = "tf32" if tf32 else "ieee"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = precision
    torch.backends.cuda.matmul.fp32_precision = precision
    # set in fast mode too: cuBLAS reads it once, when its first handle is made, and a later
    # deterministic stage in the same process needs it to have been there from the start
    workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if deterministic and workspace not in DETERMINISTIC_WORKSPACES:
        raise UserError(f"CUBLAS_WORKSPACE_CONFIG={workspace} makes cuBLAS non-deterministic; unset it, set it "
                        f"to {CUBLAS_WORKSPACE}, or set train.deterministic = false")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic  # benchmarking picks algorithms by timing
    torch.use_deterministic_algorithms(deterministic)


def check_device(device: str) -> torch.device:
    """The device named, or one line saying why it cannot be used (before any work)."""
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {device!r}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"bad device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    return dev
