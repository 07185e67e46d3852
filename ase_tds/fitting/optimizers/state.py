"""What an optimiser carries between iterations, typed: the base every optimiser's state extends, and what a
checkpoint holds (`to_dict` / `from_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

ARRAY = {"array": True}  # field metadata: saved as a list, read back as a float ndarray


@dataclass(kw_only=True)
class OptimizerState:
    """The state every optimiser has; an optimiser's own state adds its fields (`field(metadata=ARRAY)` for arrays).

    Attributes:
        theta: θ (n,) eV/Å² — during a run the latest point the optimiser reports (its checkpoint's θ), at the end
            the lowest loss it evaluated.
        whitening: R (n, n): the optimiser works in x = Rθ (a unit step ≈ one standard deviation).
        iterations: the iterations done, those before a resumed checkpoint included.
        history: the loss after each iteration, the start's first.
    """

    theta: np.ndarray = field(metadata=ARRAY)
    whitening: np.ndarray = field(metadata=ARRAY)
    iterations: int = 0
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The fields as JSON-able values (arrays as lists, numpy scalars as Python numbers)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, saved: dict):
        """The state of `to_dict()`'s content (other keys of `saved` are ignored).

        Raises:
            KeyError: a field missing from `saved`.
        """
        values = {f.name: saved[f.name] for f in dataclasses.fields(cls)}
        for f in dataclasses.fields(cls):
            if f.metadata.get("array"):
                values[f.name] = np.asarray(values[f.name], dtype=float)
        return cls(**values)


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
