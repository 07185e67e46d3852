"""Checkpoints of a fit: a JSON file rewritten atomically after every iteration, and resumed from.

Content: the format tag, the model's parameter labels, the fit settings, for the sampling model the θ its
Monte-Carlo weights were measured at (the first start), and the optimiser's own typed state (`OptimizerState`:
θ eV/Å², iterations done, loss history, the whitening matrix R (n, n) it works in, and what the optimiser adds,
e.g. Adam's moments), its fields at the top level. A checkpoint resumes only the fit it was written by (same format,
labels and settings).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_atomic

FORMAT = "ase_tds fit checkpoint 2"


class Checkpoint:
    """The checkpoint file `path` of a fit of a model with `labels` under `settings` (a JSON-able dict).

    Args:
        path (str | Path): the JSON checkpoint file; it need not exist yet.
        labels (Sequence[str]): (n,) the model's parameter labels: a checkpoint of other labels is refused.
        settings: the fit settings (JSON-able): a checkpoint written under other values is refused.

    Attributes:
        monte_carlo_theta (list | None): θ (n,) of the sampling model's Monte-Carlo weights, written with every
            state (and read back by `load`).
    """

    def __init__(self, path, labels, settings: dict):
        self.path = Path(path)
        self.labels = list(labels)
        self.settings = json.loads(json.dumps(settings))
        self.monte_carlo_theta = None

    def load(self, state_type):
        """The saved optimiser state, or None without a file; `monte_carlo_theta` is set from the file.

        Args:
            state_type (type[OptimizerState]): the state class of the fit's optimiser (its `from_dict` reads it).

        Returns:
            An instance of `state_type`, or None when the file does not exist.

        Raises:
            ValueError: the file cannot be read, is of another format, or belongs to another fit (labels or
                settings).
        """
        if not self.path.exists():
            return None
        try:
            saved = json.loads(self.path.read_text())
        except ValueError as err:
            raise ValueError(f"{self.path}: not a readable fit checkpoint ({err}); delete it or give another "
                             "checkpoint path") from err
        found = saved.get("format") if isinstance(saved, dict) else None
        if found != FORMAT:
            raise ValueError(f"{self.path}: not a fit checkpoint of this version of ase_tds (format {found!r}, not "
                             f"{FORMAT!r}); delete it or give another checkpoint path")
        self._check_same_fit(saved)
        try:
            state = state_type.from_dict(saved)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path}: not a readable fit checkpoint ({type(err).__name__}: {err}); delete it "
                             "or give another checkpoint path") from err
        self.monte_carlo_theta = saved.get("monte_carlo_theta")
        return state

    def _check_same_fit(self, saved: dict) -> None:
        """Refuse a checkpoint of other labels or settings (a setting the file lacks was added after it was
        written: its default then, not a conflict)."""
        if saved.get("labels") != self.labels:
            raise ValueError(f"{self.path}: a checkpoint of a model with parameters {saved.get('labels')}, not "
                             f"{self.labels}; delete it or give another checkpoint path")
        written = saved.get("settings") or {}
        changed = {k: (written[k], v) for k, v in self.settings.items() if k in written and written[k] != v}
        if changed:
            detail = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in changed.items())
            raise ValueError(f"{self.path}: a checkpoint of a fit with other settings ({detail}); resume with the "
                             "same settings, or delete it / give another checkpoint path")

    def write(self, state) -> None:
        """Rewrite the file with `state` (atomically; under torch.distributed rank 0 only: every rank holds the same
        state).

        Args:
            state (OptimizerState): the optimiser's state (its `to_dict()` is written).
        """
        from .. import distributed

        if not distributed.is_main():
            return
        theta = self.monte_carlo_theta
        payload = {"format": FORMAT, "labels": self.labels, "settings": self.settings,
                   "monte_carlo_theta": theta.tolist() if hasattr(theta, "tolist") else theta, **state.to_dict()}
        write_atomic(self.path, json.dumps(payload))
