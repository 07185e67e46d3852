"""Data-parallel fits with torch.distributed: each rank evaluates a shard of the points, sums are all-reduced.

Started by torchrun (or srun with torchrun's environment): `torchrun --nproc-per-node N -m ase_tds -- fit ...`.
`start()` joins the process group that torchrun's environment variables describe (gloo on CPU, NCCL on CUDA);
without them everything here is the single-process identity, so the fit's code has one path. Every rank runs
the same optimiser on the same all-reduced loss and gradient, so every rank holds the same θ; only rank 0
writes files and shows progress.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is in a torch.distributed process group.

    Returns:
        True inside a process group (`start` joined one).
    """
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank.

    Returns:
        The rank in the process group; 0 on one process.
    """
    return dist.get_rank() if active() else 0


def size() -> int:
    """The number of processes.

    Returns:
        The world size of the process group; 1 on one process.
    """
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files and shows progress.

    Returns:
        True on rank 0 (and on one process).
    """
    return rank() == 0


def start(device: str = "cpu") -> bool:
    """Join the process group of torchrun's environment (WORLD_SIZE > 1); False when there is none.

    Args:
        device: the device the fit runs on: "cuda…" joins with NCCL (on the GPU LOCAL_RANK), anything else with gloo.

    Returns:
        True inside a process group (joined now or before), False on one process.
    """
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    """Wait until every rank gets here (nothing on one process): e.g. rank 0's files are written before any rank
    exits, since torchrun stops the others as soon as one exits with a non-zero code."""
    if active():
        dist.barrier()


def stop() -> None:
    """Leave the process group, if any."""
    if active():
        dist.destroy_process_group()


def shard(n: int) -> np.ndarray:
    """The indices (contiguous, nearly equal blocks) of n points that this rank evaluates.

    Args:
        n: the number of points.

    Returns:
        This rank's indices, ascending (all n on one process).
    """
    bounds = np.linspace(0, n, size() + 1).round().astype(int)
    return np.arange(bounds[rank()], bounds[rank() + 1])


def total(value):
    """The sum over ranks of a tensor, ndarray or float (the same type back); the value itself on one process.

    Args:
        value (torch.Tensor | np.ndarray | float): this rank's part; the same shape on every rank.

    Returns:
        (torch.Tensor | np.ndarray | float): the sum, of the type of `value` (a tensor on its device).
    """
    if not active():
        return value
    tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).clone()
    on = tensor.device
    tensor = tensor.to(_wire())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor = tensor.to(on)
    if torch.is_tensor(value):
        return tensor
    return float(tensor) if np.ndim(value) == 0 else tensor.numpy()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The concatenation over ranks (in rank order) of a 1-D tensor of per-point values.

    Args:
        tensor: this rank's values (its `shard`), 1-D; the lengths may differ between ranks.

    Returns:
        All ranks' values, on the device of `tensor`; the tensor itself on one process.
    """
    if not active():
        return tensor
    wire = _wire()
    lengths = [torch.zeros(1, dtype=torch.int64, device=wire) for _ in range(size())]
    dist.all_gather(lengths, torch.tensor([len(tensor)], dtype=torch.int64, device=wire))
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=wire)
    padded[: len(tensor)] = tensor.detach().to(wire)
    parts = [torch.zeros_like(padded) for _ in range(size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, lengths)]).to(tensor.device)


def _wire() -> str:
    """The device collectives run on: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"
