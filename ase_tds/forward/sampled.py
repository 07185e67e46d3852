"""The sampling model: the published Monte-Carlo route (Cholesky sampling of thermal displacements on a periodic
supercell, `ase_tds.sampling`), in the forward-model protocol (docs/theory.md, "Forward models")."""

from __future__ import annotations

import torch

from .. import sampling
from .base import ForwardModel


class SampledModel(ForwardModel):
    """Sampled I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹ on the sampler's supercell reciprocal lattice.

    Args:
        force_constants (ForceConstantSource): as `ForwardModel`.
        temperature (float): K, as `ForwardModel`.
        statistics (str): as `ForwardModel`.
        form_factors (str | Mapping): as `ForwardModel`.
        chunk (int | None): as `ForwardModel`.
        sampler (DenseSampler | QSpaceSampler): the sampler; it must share the force constants, temperature and
            statistics (its thermal covariance is this model's).

    Raises:
        ValueError: no sampler, or one with other force constants, temperature or statistics.
    """

    name = "sampling"
    monte_carlo = True
    supports_subset = False  # its points share sampled modes per q
    default_optimizer = "adam"

    def __init__(self, force_constants, temperature: float, statistics: str = "quantum", form_factors="xraydb",
                 chunk: int | None = None, sampler=None):
        if sampler is None:
            raise ValueError("method='sampling' needs a sampler (ase_tds.sampling.DenseSampler or QSpaceSampler)")
        if sampler.model is not force_constants:
            raise ValueError("the sampling model and its sampler must share one ForceConstantModel")
        if sampler.temperature != float(temperature) or sampler.statistics != statistics:
            raise ValueError(f"the sampling model ({float(temperature):g} K, {statistics}) and the sampler "
                             f"({sampler.temperature:g} K, {sampler.statistics}) must use one temperature and "
                             "statistics")
        super().__init__(force_constants, temperature, statistics, form_factors, chunk, sampler.covariance)
        self.sampler = sampler

    def forward(self, q, levels=None) -> torch.Tensor:
        return self.intensity(q)[0]

    def intensity(self, q) -> tuple[torch.Tensor, torch.Tensor]:
        """(I(Q) (B,), its Monte-Carlo standard error (B,)), e.u. per atom (`sampler.intensity`)."""
        return self.sampler.intensity(self.form_factors, self.as_q(q))

    def options(self) -> dict:
        return {**super().options(), "sampler": self.sampler}

    def settings(self) -> dict:
        sampler = self.sampler
        seed = None if sampler.seed is None else int(sampler.seed)
        spec = dict(kind=type(sampler).__name__, supercell=list(sampler.supercell), n_samples=sampler.n_samples,
                    seed=seed)
        return {**super().settings(), "sampler": spec}

    @classmethod
    def settings_options(cls, force_constants, settings: dict) -> dict:
        """The sampler that `settings` name, rebuilt on `force_constants` (an unseeded fit's at seed 0).

        Raises:
            ValueError: settings that do not name the sampler.
        """
        spec = settings.get("sampler") or {}
        if spec.get("kind") not in ("DenseSampler", "QSpaceSampler"):
            raise ValueError("the settings do not name the sampling model's sampler (kind, supercell, n_samples, "
                             "seed)")
        seed = 0 if spec["seed"] is None else spec["seed"]
        sampler = getattr(sampling, spec["kind"])(force_constants, spec["supercell"], settings["temperature"],
                                                  settings["statistics"], n_samples=spec["n_samples"], seed=seed,
                                                  progress=False)
        return {"sampler": sampler}
