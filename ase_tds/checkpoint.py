"""Checkpoints of a fit: a JSON file rewritten atomically after every iteration, and resumed from.

Content: format tag, the model's parameter labels, the fit settings, θ (eV/Å²), iterations done, loss history,
the whitening matrix R (n, n) the optimiser works in, Adam's state (x, moments, step size, best point), and for
the sampling model the θ its Monte-Carlo weights were measured at (the first start).
A checkpoint resumes only the fit it was written by (same labels and settings); a file holding just
{"theta": [...]} (an older format, or written by hand) is taken as a starting θ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_paths

FORMAT = "ase_tds fit checkpoint 1"


def write_atomic(path, text: str) -> None:
    """Write text to `path` through a temporary file and a rename: the old file or the new, never half.

    Args:
        path (str | Path): the file; its folder must exist.
        text: the whole content.
    """
    with atomic_paths(path) as (partial,):
        partial.write_text(text)


class Checkpoint:
    """The checkpoint file `path` of a fit of a model with `labels` under `settings` (a JSON-able dict).

    Args:
        path (str | Path): the JSON checkpoint file; it need not exist yet.
        labels (Sequence[str]): (n,) the model's parameter labels: a checkpoint of other labels is refused.
        settings: the fit settings (JSON-able): a checkpoint written under other values is refused.
    """

    def __init__(self, path, labels, settings: dict):
        self.path = Path(path)
        self.labels = list(labels)
        self.settings = json.loads(json.dumps(settings))
        self.monte_carlo_theta = None  # θ (n,) of the sampling model's Monte-Carlo weights, saved with each write

    def load(self) -> dict | None:
        """The saved state (theta, iterations, history, whitening, adam, monte_carlo_theta), or None without a file.

        Returns:
            None without a file; else a dict: theta (n,) eV/Å², iterations (int), history (list of losses or
                None), whitening R (n, n) or None, adam (dict or None), monte_carlo_theta ((n,) list or None).
                A bare {"theta": [...]} file gives iterations 0 and None for the rest.

        Raises:
            ValueError: the file belongs to another fit (labels or settings) or cannot be read.
        """
        if not self.path.exists():
            return None
        try:
            saved = json.loads(self.path.read_text())
            theta = np.asarray(saved["theta"], dtype=float)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: not a readable fit checkpoint ({err}); delete it or give another "
                             "checkpoint path") from err
        if saved.get("format") != FORMAT:  # a bare θ: a start, no optimiser state
            if theta.shape != (len(self.labels),):
                raise ValueError(f"{self.path}: holds {theta.size} values of θ for a model with {len(self.labels)} "
                                 "parameters; delete it or give another checkpoint path")
            return {"theta": theta, "iterations": 0, "history": None, "whitening": None, "adam": None,
                    "monte_carlo_theta": None}
        if saved["labels"] != self.labels:
            raise ValueError(f"{self.path}: a checkpoint of a model with parameters {saved['labels']}, not "
                             f"{self.labels}; delete it or give another checkpoint path")
        # a setting the file lacks was added after it was written: its default then, not a conflict
        changed = {k: (saved["settings"][k], v) for k, v in self.settings.items()
                   if k in saved["settings"] and saved["settings"][k] != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(f"{self.path}: a checkpoint of a fit with other settings ({detail}); resume with the "
                             "same settings, or delete it / give another checkpoint path")
        return {"theta": theta, "iterations": int(saved["iterations"]), "history": list(saved["history"]),
                "whitening": np.asarray(saved["whitening"], dtype=float), "adam": saved.get("adam"),
                "monte_carlo_theta": saved.get("monte_carlo_theta")}

    def write(self, theta, iterations: int, history, whitening, adam: dict | None = None) -> None:
        """Rewrite the file (atomically; under torch.distributed rank 0 only: every rank holds the same state).

        Args:
            theta (array_like): θ (n,) eV/Å².
            iterations: optimiser iterations done.
            history (Sequence[float]): the loss after each iteration (floats).
            whitening (array_like): the whitening matrix R (n, n) the optimiser works in.
            adam: Adam's state (x, moments, step size, best point) as a dict of arrays and numbers; None = none.
        """
        from . import distributed

        if not distributed.is_main():
            return

        def plain(value):
            return value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value

        payload = {"format": FORMAT, "labels": self.labels, "settings": self.settings,
                   "theta": np.asarray(theta, dtype=float).tolist(), "iterations": int(iterations),
                   "history": [float(h) for h in history], "whitening": np.asarray(whitening).tolist(),
                   "adam": None if adam is None else {k: plain(v) for k, v in adam.items()},
                   "monte_carlo_theta": plain(self.monte_carlo_theta)}
        write_atomic(self.path, json.dumps(payload))
