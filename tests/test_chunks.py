"""map_chunks: chunks in order, in worker threads that keep the caller's grad mode, errors passed on."""

from __future__ import annotations

import threading

import pytest
import torch

from ase_tds.chunks import map_chunks, matrix_chunk


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("grad", [True, False])
def test_chunks_run_in_order_in_workers_with_the_callers_grad_mode(two_threads, grad):
    x = torch.arange(10.0)
    seen = []

    def record(piece):
        seen.append((threading.get_ident(), torch.is_grad_enabled(), torch.get_num_threads()))
        return piece * 2

    with torch.set_grad_enabled(grad):
        out = map_chunks(record, (x,), 3)
    assert torch.equal(torch.cat(out), 2 * x) and [len(p) for p in out] == [3, 3, 3, 1]
    assert {mode for _, mode, _ in seen} == {grad}
    assert {threads for _, _, threads in seen} == {1}  # each worker single-threaded
    assert threading.get_ident() not in {ident for ident, _, _ in seen}
    assert torch.get_num_threads() == 2  # the caller's setting is untouched


def test_one_chunk_or_one_thread_runs_in_the_caller(two_threads):
    here = threading.get_ident()
    assert map_chunks(lambda p: threading.get_ident(), (torch.zeros(4),), 8) == [here]
    torch.set_num_threads(1)
    assert set(map_chunks(lambda p: threading.get_ident(), (torch.zeros(4),), 1)) == {here}


def test_an_error_in_a_worker_reaches_the_caller(two_threads):
    def fail(piece):
        if piece[0] > 5:
            raise ArithmeticError(f"bad chunk at {int(piece[0])}")
        return piece

    with pytest.raises(ArithmeticError, match="bad chunk at 6"):
        map_chunks(fail, (torch.arange(10.0),), 3)


def test_matrix_chunk_keeps_about_half_a_million_entries():
    assert matrix_chunk(1) == 8192 and matrix_chunk(1, 4096) == 4096
    assert matrix_chunk(32) == 2**19 // (9 * 32**2)
    assert matrix_chunk(400) == 16


def test_threads_started_later_keep_the_callers_thread_count(two_threads):
    map_chunks(lambda p: p, (torch.zeros(10),), 3)
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one leading length"):
        map_chunks(lambda a, b: a, (torch.zeros(4), torch.zeros(5)), 2)
    with pytest.raises(ValueError, match="chunk ≥ 1"):
        map_chunks(lambda a: a, (torch.zeros(4),), 0)
