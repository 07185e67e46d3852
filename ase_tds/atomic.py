"""Output files written all or nothing: under temporary names beside the targets, renamed when complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yields one temporary path per target (same folder); all are renamed onto the targets once the
    block has finished without error, and removed otherwise, the targets untouched. The files are
    new files of the writer (the user's umask applies). A temporary name keeps its target's suffix
    (".fit.1234.part.json"), so writers that choose a format by suffix (matplotlib) work on it.

        with atomic_paths("out.h5") as (partial,):
            write(partial)
    """
    targets = [Path(p) for p in paths]
    partial = [p.with_name(f".{p.stem}.{os.getpid()}.part{p.suffix}") for p in targets]
    try:
        yield partial
        for tmp, target in zip(partial, targets):
            os.replace(tmp, target)
    finally:
        for tmp in partial:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_atomic(path, text: str) -> None:
    """Write text to `path` through a temporary file and a rename: the old file or the new, never half.

    Args:
        path (str | Path): the file; its folder must exist.
        text: the whole content.
    """
    with atomic_paths(path) as (partial,):
        partial.write_text(text)


def write_files(folder, writers: dict) -> None:
    """Write {file name: write(path)} into `folder` as one set, all or nothing (`atomic_paths`).

    Args:
        folder (str | Path): the existing folder the files go into.
        writers: for each file name, a function that writes that file at the path it is given.
    """
    with atomic_paths(*(Path(folder) / name for name in writers)) as partial:
        for write, path in zip(writers.values(), partial):
            write(path)
