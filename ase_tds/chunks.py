"""Evaluation over chunks of a batch of q, in parallel CPU threads.

Batched small linear algebra (a Cholesky factorisation per q) runs one matrix at a time inside torch on
the CPU, so one Python thread leaves cores idle. Here each chunk goes to one of torch.get_num_threads()
worker threads, each single-threaded (the GIL is released inside torch ops). The caller's grad mode
holds in the workers; results come back in order, so sums over them are deterministic. On other devices,
and for a single chunk, the chunks run in the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable
import threading

import torch


def matrix_chunk(n_atoms: int, limit: int = 8192) -> int:
    """q per chunk for (3n × 3n) matrices: about 2¹⁹ entries (cache-sized), between 16 and `limit`.

    Args:
        n_atoms: n, atoms in the primitive cell.
        limit: the largest chunk.

    Returns:
        q per chunk.
    """
    return int(min(max(2**19 // (9 * n_atoms**2), 16), limit))


def map_chunks(func: Callable, tensors: tuple[torch.Tensor, ...], chunk: int) -> list:
    """[func(*pieces) for each run of `chunk` rows of `tensors` (same leading length)], in order.

    Worker w of W takes chunks w, w + W, w + 2W, … with torch.get_num_threads() // W threads: a fixed
    assignment, so the autograd graph (whose node order follows each thread's creation order) and hence
    the gradient's rounding are the same on every call. A failing chunk stops the later ones, and the error
    of the first failing chunk is raised; the caller's thread count is restored for the process.

    Args:
        func: called with one chunk of each tensor, in the order of `tensors`.
        tensors: the batch, one or more tensors of the same leading length.
        chunk: rows per chunk, ≥ 1.

    Returns:
        func's result for each chunk, in the order of the chunks.

    Raises:
        ValueError: tensors of different leading lengths, or chunk < 1.
    """
    if len({len(t) for t in tensors}) != 1 or int(chunk) < 1:
        raise ValueError(f"map_chunks: tensors of one leading length and chunk ≥ 1, got "
                         f"{[len(t) for t in tensors]} and {chunk}")
    pieces = list(zip(*(t.split(int(chunk)) for t in tensors)))
    threads = torch.get_num_threads()
    workers = min(threads, len(pieces))
    if workers <= 1 or tensors[0].device.type != "cpu":
        return [func(*piece) for piece in pieces]
    grad = torch.is_grad_enabled()
    results, errors = [None] * len(pieces), []  # errors: (chunk, exception), appended by the workers

    def work(first):
        torch.set_num_threads(max(1, threads // workers))
        with torch.set_grad_enabled(grad):
            for i in range(first, len(pieces), workers):
                if any(j < i for j, _ in errors[:]):  # an earlier chunk failed: this one's result is not wanted
                    return
                try:
                    results[i] = func(*pieces[i])
                except BaseException as err:  # noqa: BLE001 - raised in the caller below
                    errors.append((i, err))
                    return

    pool = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    try:
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    finally:
        torch.set_num_threads(threads)  # set_num_threads in a worker also sets the default of new threads
    if errors:
        raise min(errors, key=lambda item: item[0])[1]
    return results
