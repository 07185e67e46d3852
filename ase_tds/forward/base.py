"""The forward-model protocol: I(Q) in e.u. per atom from a force-constant source (docs/theory.md, "Forward models").

Every forward model is a `ForwardModel`: a torch module whose only parameter is the force constants' θ, with
- `name` (its key in `ase_tds.forward.MODELS`), and what a fit needs to know of it: `monte_carlo` (its intensities
  carry a Monte-Carlo error; a smooth loss needs a seed), `has_grid` (it discretises the crystal and estimates its
  own error, `discretisation_error`), `supports_subset` (a first fit on a subset of the points is valid),
  `default_optimizer`;
- `forward(q)` → I (B,), `intensity(q)` → (I, standard error or None), `discretisation_error(q)`;
- `settings()` (what fixes its numbers, for records) and `from_settings(force_constants, settings)` (the same model
  again, e.g. to redraw a fit).
The amplitude A_κ(Q) = f_κ(|Q|) e^{−W_κ(Q)} is built in one place (`amplitude`) from an explicit `DebyeWaller`.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar

import numpy as np
import torch

from ..covariance import ThermalCovariance
from ..scattering import DebyeWaller, FormFactors
from ..source import ForceConstantSource


class ForwardModel(torch.nn.Module):
    """I(Q) (B,) e.u./atom at Cartesian Q (B, 3) Å⁻¹; differentiable in the force constants' θ.

    Args:
        force_constants: a `ForceConstantSource`: a ForceConstantModel (its θ is this module's only parameter) or
            PhonopyForceConstants (nothing trainable).
        temperature: K (> 0, or 0 with quantum statistics).
        statistics: "classical" | "quantum".
        form_factors (str | Mapping): "xraydb" or {symbol: constant or f(|Q|)} in e.u. (`FormFactors`).
        chunk: Q per block (None: by matrix entries and terms per Q).
        covariance: the thermal covariance to use (None: built from the three above).

    Raises:
        ValueError: an unknown statistics, a temperature it cannot use, or form factors for symbols not in the
            crystal.
    """

    name: ClassVar[str] = ""
    monte_carlo: ClassVar[bool] = False
    has_grid: ClassVar[bool] = False
    supports_subset: ClassVar[bool] = True
    default_optimizer: ClassVar[str] = "lbfgs"

    def __init__(self, force_constants: ForceConstantSource, temperature: float, statistics: str = "quantum",
                 form_factors="xraydb", chunk: int | None = None, covariance: ThermalCovariance | None = None):
        super().__init__()
        covariance = covariance or ThermalCovariance(force_constants, temperature, statistics)
        self.force_constants = force_constants
        self.covariance = covariance
        self.temperature = covariance.temperature
        self.statistics = statistics
        self.form_factors = FormFactors(force_constants.primitive.get_chemical_symbols(), form_factors)
        self._chunk = None if chunk is None else int(chunk)
        self._cache = {}
        self._shared = None  # inside covariance_once: {name: (value in θ's graph, its detached leaves)}

    @property
    def method(self) -> str:
        """The model's name in `ase_tds.forward.MODELS` (fit.json's "method")."""
        return self.name

    # ------------------------------------------------------------------ what every model shares
    def _at_fixed_theta(self, name, compute):
        """compute() once per θ where no gradient is wanted (repeated evaluations at fixed force
        constants); in the graph whenever θ needs a gradient: recomputed at every call, or once inside
        `covariance_once`."""
        theta = self.force_constants.theta
        if torch.is_grad_enabled() and theta.requires_grad:
            if self._shared is None:
                return compute()
            if name not in self._shared:
                value = compute()
                self._shared[name] = (value, tuple(v.detach().requires_grad_(True) for v in value))
            return self._shared[name][1]
        key, value = self._cache.get(name, (None, None))
        if key is None or key.device != theta.device or not torch.equal(key, theta):
            key, value = theta.detach().clone(), compute()
            self._cache[name] = (key, value)
        return value

    def forget(self) -> None:
        """Drop what was kept per θ (`_at_fixed_theta`): for force constants changed other than through θ (the far
        term `refine` refreshes)."""
        self._cache.clear()

    @contextlib.contextmanager
    def covariance_once(self):
        """Inside, the covariances that depend on θ alone (a crystal's real-space covariance, a Debye–Waller factor)
        enter θ's graph once, as leaves: gradients of many evaluations (a fit's chunks of points) collect on them,
        and on leaving one backward pass carries their sum to θ. Without it each chunk's backward pass would go
        through the covariance again."""
        self._shared = {}
        try:
            yield
            pairs = [(v, leaf.grad) for value, leaves in self._shared.values() for v, leaf in zip(value, leaves)
                     if leaf.grad is not None]
            self._shared = None  # the leaves are not needed in the backward (the fft model's are large)
            if pairs:
                torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
        finally:
            self._shared = None

    def amplitude(self, q: torch.Tensor, debye_waller: DebyeWaller) -> torch.Tensor:
        """A_κ(Q) = f_κ(|Q|) e^{−W_κ(Q)}, (B, n) e.u., for q (B, 3) Å⁻¹.

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.
            debye_waller: the Debye–Waller factor of each atom.

        Returns:
            A_κ(Q), (B, n) e.u.
        """
        return self.form_factors(torch.linalg.norm(q, dim=-1)) * debye_waller.factor(q)

    def as_q(self, q) -> torch.Tensor:
        """q (array or tensor) as a (B, 3) tensor of the force constants' dtype and device."""
        fc = self.force_constants
        return torch.as_tensor(q, dtype=fc.dtype, device=fc.device).reshape(-1, 3)

    # ------------------------------------------------------------------ the protocol
    def forward(self, q, levels=None) -> torch.Tensor:
        """I(Q) (B,) e.u./atom at Cartesian q (B, 3) Å⁻¹ (array or tensor; reshaped to (-1, 3)).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.
            levels (array_like | torch.Tensor | None): the crystal each Q uses (models with a grid; ignored else).

        Returns:
            I(Q), (B,) e.u. per atom.

        Raises:
            UnstableError: the force constants are not dynamically stable.
        """
        raise NotImplementedError

    def intensity(self, q) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(I(Q) (B,), its Monte-Carlo standard error (B,) or None for a deterministic model), e.u. per atom.

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.

        Returns:
            I(Q) and its standard error (None: exact up to the model's discretisation).
        """
        return self(q), None

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """(B,) the crystal each Q uses: all 0 for a model without a grid.

        Args:
            q: Cartesian Q (B, 3) Å⁻¹.

        Returns:
            The level of each Q, (B,) int64.
        """
        return torch.zeros(len(q), dtype=torch.long, device=q.device)

    @torch.no_grad()
    def discretisation_error(self, q, levels=None, signed: bool = False) -> torch.Tensor:
        """The model's own error estimate (B,) e.u./atom at Cartesian q (B, 3) Å⁻¹: zero for a model with nothing to
        discretise (`has_grid` False).

        Args:
            q (array_like | torch.Tensor): Cartesian Q (B, 3) Å⁻¹.
            levels (torch.Tensor | None): the crystal each Q uses (models with a grid).
            signed: give the signed error (its sign says which way the model errs).

        Returns:
            The error, (B,) e.u. per atom.
        """
        q = self.as_q(q)
        return torch.zeros(len(q), dtype=q.dtype, device=q.device)

    def intensity_hkl(self, hkl, cell=None) -> torch.Tensor:
        """I (N,) e.u./atom at hkl (N, 3) in r.l.u. of `cell` (3, 3) Å (default: the force constants' unit cell).

        Args:
            hkl (array_like): (N, 3) r.l.u. of `cell`.
            cell (array_like | None): (3, 3) Å, rows the lattice vectors; None: the force constants' `unitcell`.

        Returns:
            I, (N,) e.u. per atom.
        """
        return self(self.force_constants.q_from_hkl(np.asarray(hkl, dtype=float), cell))

    def options(self) -> dict:
        """The keyword arguments that rebuild this model (besides force constants, temperature and statistics)."""
        return {"form_factors": self.form_factors.source, "chunk": self._chunk}

    def settings(self) -> dict:
        """What fixes this model's numbers (for records: fit.json, simulated files).

        Returns:
            method (the model's name), statistics and temperature, and the model's own settings.
        """
        return dict(method=self.name, statistics=self.statistics, temperature=self.temperature)

    @classmethod
    def settings_options(cls, force_constants: ForceConstantSource, settings: dict) -> dict:
        """The keyword arguments of this model recorded in `settings` (`settings()`'s output, fit.json's)."""
        return {}

    @classmethod
    def from_settings(cls, force_constants: ForceConstantSource, settings: dict, **options) -> ForwardModel:
        """The model that `settings` describe (a fit's recorded settings), on `force_constants`.

        Args:
            force_constants: the force constants (e.g. the fitted ones).
            settings: `settings()` of the model, e.g. fit.json's "settings".
            **options (Any): further keyword arguments (e.g. form_factors), over those of `settings`.

        Returns:
            The model.
        """
        options = {**cls.settings_options(force_constants, settings), **options}
        return cls(force_constants, settings["temperature"], statistics=settings["statistics"], **options)

    def for_points(self, q) -> ForwardModel:
        """The model to evaluate at the points q (B, 3) Å⁻¹ alone (e.g. a first fit's subset): this one, except where
        a model does work for the points it was built for (the fft route's voxels)."""
        return self

    def rebuilt(self, **changes) -> ForwardModel:
        """This model with some options changed (same force constants, temperature and statistics).

        Args:
            **changes (Any): keyword arguments of the model's constructor.

        Returns:
            A new model of the same kind.
        """
        return type(self)(self.force_constants, self.temperature, statistics=self.statistics,
                          **{**self.options(), **changes})
