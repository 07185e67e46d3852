"""The result of a fit: θ with labels and 1σ, correlations, χ², the settings used, and how it is written (fit.json,
the fit folder)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..atomic import write_atomic
from ..born import unit_of
from ..data import TDSData

# what to_dict writes and from_dict needs
SAVED_KEYS = ("parameters", "correlation", "scale", "background", "compton", "chi2", "chi2_red", "deviance",
              "n_points", "iterations", "status", "settings", "model_error", "combinations", "warnings",
              "trusted", "missing_physics")


def versions() -> dict:
    """The versions of ase_tds and what it computes with, for a record (fit.json)."""
    import ase
    import phonopy

    from .. import __version__

    return {"ase_tds": __version__, "torch": torch.__version__, "ase": ase.__version__, "phonopy": phonopy.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass
class FitResult:
    """Fitted θ with labels, 1σ (Gauss–Newton), correlation, χ² and the settings used; `save` writes them all.

    Attributes:
        labels: the parameter labels (n_params,), e.g. "1XX".
        theta: fitted θ (n_params,) eV/Å².
        sigma: 1σ (n_params,) eV/Å².
        covariance: (n_params, n_params) (eV/Å²)².
        correlation: (n_params, n_params).
        scale: the fitted (or fixed) scale s.
        background: the constant background b, data units.
        chi2: Σ (m − I_obs)²/var with var = σ² (loss "chi2") or the Poisson variance m/exposure (loss "poisson"),
            plus for "sampling" the Monte-Carlo variance of its fixed-seed estimate (also in sigma).
        chi2_red: χ²/(N_used − n_free).
        n_points: the points used.
        iterations: the optimiser's iterations, those before a resumed checkpoint included.
        settings: method, statistics, temperature (K), the model's grid (gaussian: grid, refine, accuracy,
            near_bragg_grids; one-phonon: dw_mesh), scale, background, compton, loss, optimizer, prior_sigma, the
            data's fingerprint, and for "sampling" the sampler {kind, supercell, n_samples, seed} (seed None: the
            fit's final evaluation used 0).
        warnings: the notes the fit warned with (undetermined combinations, misfit, the model's own error...).
        history: the loss after each iteration.
        compton: the Compton amplitude A (None when not fitted).
        deviance: the Poisson deviance (loss "poisson" only).
        compton_shape: c(|Q|) of the Compton term (None when not fitted).
        model_error: the gaussian model's own error estimate |I(grid) − I(1.5 × grid)| at the fitted θ (median and
            largest relative, largest in units of σ, the share of points above σ/5, and the largest share of a
            θ_k's variance that twice this error, propagated to θ, makes up) and `at_start`, where it chose the
            points' crystals and was added to their weights (see `fit`).
        status: how the optimiser ended, {"converged": bool, "reason": text} (a criterion met, the iteration
            limit, or a stall); θ is the lowest loss it evaluated.
        combinations: the eigen-combinations of θ that the data alone determine, least determined first
            (`uncertainty.parameter_combinations` of the profiled Gauss–Newton matrix; without the prior).
        trusted: False where the model does not describe the data (χ² far above its expectation): the 1σ then
            cannot be trusted, however scaled.
        missing_physics: for such a fit, what it most likely misses and the evidence (`fitting.missing`); else {}.
    """

    labels: list
    theta: np.ndarray
    sigma: np.ndarray
    covariance: np.ndarray
    correlation: np.ndarray
    scale: float
    background: float
    chi2: float
    chi2_red: float
    n_points: int
    iterations: int
    settings: dict
    warnings: list = field(default_factory=list)
    history: list = field(default_factory=list)
    compton: float | None = None
    deviance: float | None = None
    compton_shape: Callable | None = field(default=None, repr=False)
    model_error: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    combinations: list = field(default_factory=list)
    trusted: bool = True
    missing_physics: dict = field(default_factory=dict)

    def calculated(self, intensity, q_norm) -> np.ndarray:
        """The fitted model of the data, s·I + b + A·c(|Q|).

        Args:
            intensity (array_like): I (N,) e.u./atom of the force-constant model.
            q_norm (array_like): |Q| (N,) Å⁻¹.

        Returns:
            (N,) in the data's units.
        """
        value = self.scale * np.asarray(intensity, dtype=float) + self.background
        if self.compton is not None:
            value = value + self.compton * np.asarray(self.compton_shape(np.asarray(q_norm, dtype=float)))
        return value

    @classmethod
    def from_dict(cls, saved: dict, symbols=None) -> FitResult:
        """The FitResult of `to_dict()`'s content (e.g. a fit.json read back), for `calculated` and `table`.

        The covariance comes back from the correlation and σ; the loss history is not saved and comes back empty.

        Args:
            saved: the dictionary (fit.json's content).
            symbols (list[str] | None): the chemical symbols of the model's primitive cell, needed to rebuild the
                Compton shape of a compton=True fit.

        Returns:
            FitResult.

        Raises:
            ValueError: a record without every key `to_dict` writes (SAVED_KEYS), a fit with a callable Compton shape
                (fit.json cannot hold it), or a Compton term without `symbols`.
        """
        missing = [key for key in SAVED_KEYS if key not in saved]
        if missing:
            raise ValueError(f"not a fit record of this version of ase_tds: it lacks {', '.join(missing)}; fit again "
                             "to write a complete fit.json")
        params = saved["parameters"]
        sigma = np.array([p["sigma"] for p in params], dtype=float)
        correlation = np.array(saved["correlation"], dtype=float).reshape(len(params), len(params))
        settings = dict(saved["settings"])
        shape = None
        if saved["compton"] is not None:
            if settings.get("compton") is not True:
                raise ValueError("this fit used a callable Compton shape, which fit.json cannot hold; evaluate the "
                                 "model in Python with that shape (FitResult.calculated of the fit itself)")
            if symbols is None:
                raise ValueError("the fit has a Compton term: give symbols= (the primitive cell's chemical symbols) "
                                 "to rebuild its shape")
            from ..background import ComptonShape

            shape = ComptonShape(list(symbols))
        return cls(labels=[p["label"] for p in params], theta=np.array([p["value"] for p in params], dtype=float),
                   sigma=sigma, covariance=correlation * np.outer(sigma, sigma), correlation=correlation,
                   scale=float(saved["scale"]), background=float(saved["background"]), chi2=float(saved["chi2"]),
                   chi2_red=float(saved["chi2_red"]), n_points=int(saved["n_points"]),
                   iterations=int(saved["iterations"]), settings=settings, warnings=list(saved["warnings"]),
                   compton=saved["compton"], deviance=saved["deviance"], compton_shape=shape,
                   model_error=dict(saved["model_error"]), status=dict(saved["status"]),
                   combinations=list(saved["combinations"]), trusted=bool(saved["trusted"]),
                   missing_physics=dict(saved["missing_physics"]))

    @property
    def undetermined(self) -> bool:
        """Whether some 1σ are not finite or absurdly large (`fitting.covariance.SIGMA_MEANINGLESS`)."""
        from .covariance import SIGMA_MEANINGLESS

        return bool(np.any(~np.isfinite(self.sigma) | (np.asarray(self.sigma) > SIGMA_MEANINGLESS)))

    def table(self) -> str:
        """Plain-text table: label, value and 1σ (eV/Å²) per parameter, then the nuisance values and χ²_red."""
        lines = [f"{'label':<14}{'value':>12}{'1σ':>11}  unit"]
        number = lambda x, width: f"{x:>{width}.5f}" if abs(x) < 1e5 else f"{x:>{width}.3g}"  # noqa: E731 (no 150 digits)
        lines += [f"{k:<14}{number(v, 12)}{number(s, 11)}  {unit_of(k)}"
                  for k, v, s in zip(self.labels, self.theta, self.sigma)]
        compton = "" if self.compton is None else f", Compton amplitude {self.compton:.6g}"
        lines.append(f"scale {self.scale:.6g}, background {self.background:.6g}{compton}, "
                     f"χ²_red {self.chi2_red:.4g} on {self.n_points} points")
        if self.status:
            lines.append(f"{'converged' if self.status['converged'] else 'NOT converged'} after {self.iterations} "
                         f"iterations: {self.status['reason']}")
        if not self.trusted and self.undetermined:
            lines.append("NOT TRUSTED: the data do not determine these force constants (1σ not finite or absurd), so "
                         "these 1σ are not error bars")
        elif not self.trusted:
            lines.append("NOT TRUSTED: the model does not describe the data (χ²_red far above 1), so these 1σ are not "
                         "error bars" + (f"; most likely missing: {self.missing_physics['likely']}"
                                         if self.missing_physics.get("likely") else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """What fit.json holds: parameters (label, value, 1σ, unit), correlation, nuisances, χ², settings, versions."""
        return {
            "parameters": [{"label": k, "value": float(v), "sigma": float(s), "unit": unit_of(k)}
                           for k, v, s in zip(self.labels, self.theta, self.sigma)],
            "correlation": self.correlation.tolist(),
            "scale": self.scale, "background": self.background, "compton": self.compton,
            "chi2": self.chi2, "chi2_red": self.chi2_red, "deviance": self.deviance, "n_points": self.n_points,
            "iterations": self.iterations, "status": self.status, "settings": self.settings,
            "model_error": self.model_error,
            "combinations": self.combinations,
            "warnings": self.warnings,
            "trusted": self.trusted, "missing_physics": self.missing_physics,
            "versions": versions(),
        }

    def write_json(self, path) -> None:
        """Write `to_dict()` as JSON atomically.

        Args:
            path (str | Path): the file.
        """
        write_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    def save(self, folder, model, data: TDSData, start=None, reference=None) -> None:
        """Write every output of this fit into `folder`, all or nothing (`report.write_fit_folder`): the fitted
        force constants as phonopy files, fit.json, data.h5 and the plots (dispersion with its ±1σ band, what the
        data determine, the TDS fit). `ase-tds fit` writes its --out folder with this.

        Args:
            folder (str | Path): the output folder (created if needed).
            model (ForceConstantModel): the fitted model (fit() left it at θ).
            data: the TDSData fitted.
            start (ForceConstantSource | None): the start's force constants, drawn in dispersion.png (None: not
                drawn).
            reference (ForceConstantSource | None): reference force constants (e.g. DFT's PhonopyForceConstants),
                drawn too (None: not drawn).
        """
        from ..report import write_fit_folder

        write_fit_folder(folder, model, self, data, start=start, reference=reference)
