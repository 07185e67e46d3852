"""The inversion: fit force constants θ to measured TDS.

Model of the data: m(Q) = s · I(Q; θ) + b + A · c(|Q|), with I from a TDSModel (e.u./atom), a global scale s
(free, or fixed to 1 for absolute data), a constant background b (free or none) and optionally the incoherent
(Compton) scattering c with a free amplitude A (`ase_tds.background`). s, b, A are eliminated at every θ
(variable projection). Loss: χ² = Σ_used ((m − I_obs)/σ)² (default) or the Poisson deviance of the counts.
Optimiser: L-BFGS (scipy) for the deterministic models, Adam for "sampling" (or L-BFGS: a seeded sampler's loss is
deterministic), both in coordinates whitened by
the Gauss–Newton matrix at the start. A step that makes the crystal dynamically unstable is rejected (the line
search backtracks; Adam backs off), never turned into NaN. A start that is already unstable is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

from . import distributed
from .background import Nuisance, poisson_deviance
from .checkpoint import Checkpoint, write_atomic
from .covariance import UnstableError, mesh_q
from .data import TDSData
from .structure import reduced_q
from .tds import GRID_FACTORS, TDSModel
from .uncertainty import parameter_combinations

LOSSES = ("chi2", "poisson")
OPTIMIZERS = ("lbfgs", "adam")
CHUNK_POINTS = 20000  # points per chunk of the loss and gradient: memory is set by a chunk, not by the data


@dataclass(frozen=True)
class Optimizer:
    """How `fit` minimises the loss and when it stops; `fit(..., optimizer=Optimizer(max_iter=60))`.

    Both optimisers work in coordinates whitened by the Gauss–Newton matrix (a unit step ≈ one standard deviation).

    Args:
        method: "lbfgs" | "adam" | None (L-BFGS; Adam for the sampling model). With a seeded sampler the
            sampling loss is a smooth deterministic function of θ, and "lbfgs" converges in far fewer evaluations.
        max_iter: iterations in all, those before a resumed checkpoint included (the first fit on a subset, if
            any, has as many of its own).
        rtol: L-BFGS stops when the relative change of the loss falls below it.
        gtol: L-BFGS stops when the projected (whitened) gradient falls below it.
        learning_rate: Adam's first step in whitened units (≈ standard deviations); None = a quarter of the first
            gradient's rms. Adam stops when its step or gradient falls below 1e-3 standard deviations.
        first_fit_points: data of more than twice this many points are first fitted on a random subset of this
            many (the same subset every time; the same grid, crystals and weights as all the points), and then,
            from there, on all of them: the long way from a poor start costs evaluations of the subset, and only
            the last few iterations cost evaluations of all the points. The result is the fit of all the points
            either way. None: all the points from the start. Not for the sampling model (its points share
            sampled modes per q); not checkpointed (a resumed fit of all the points skips it; an interrupted
            first fit starts again).

    Raises:
        ValueError: an unknown method, a negative max_iter or first_fit_points not a whole number ≥ 1.
    """

    method: str | None = None
    max_iter: int = 200
    rtol: float = 1e-9
    gtol: float = 1e-6
    learning_rate: float | None = None
    first_fit_points: int | None = 100_000

    def __post_init__(self):
        if self.method not in (None, *OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} (or None: the model's default), got "
                             f"{self.method!r}")
        if int(self.max_iter) != self.max_iter or self.max_iter < 0:
            raise ValueError(f"max_iter must be a whole number of iterations ≥ 0, got {self.max_iter!r}")
        if self.first_fit_points is not None:
            if int(self.first_fit_points) != self.first_fit_points or self.first_fit_points < 1:
                raise ValueError(f"first_fit_points must be a whole number of points ≥ 1, or None (no first fit on "
                                 f"a subset), got {self.first_fit_points!r}")
            object.__setattr__(self, "first_fit_points", int(self.first_fit_points))  # 1e5 → 100000

    def for_method(self, method: str) -> Optimizer:
        """These settings with `method` resolved for the forward model `method` (Adam for "sampling")."""
        return dataclasses.replace(self, method=self.method or ("adam" if method == "sampling" else "lbfgs"))


@dataclass
class _Run:
    """What both optimisers carry between iterations: the whitening R (n, n), the iterations already done (a
    resumed checkpoint's), the loss history (appended to), the checkpoint writer (or None), the progress bar's
    switch and its label."""

    whiten: np.ndarray
    done: int
    history: list
    saver: Checkpoint | None
    progress: bool
    label: str = "fit"


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
            ValueError: a fit with a callable Compton shape (fit.json cannot hold it), or a Compton term without
                `symbols`.
        """
        params = saved["parameters"]
        sigma = np.array([p["sigma"] for p in params], dtype=float)
        correlation = np.array(saved["correlation"], dtype=float).reshape(len(params), len(params))
        settings = dict(saved["settings"])
        shape = None
        if saved.get("compton") is not None:
            if settings.get("compton") is not True:
                raise ValueError("this fit used a callable Compton shape, which fit.json cannot hold; evaluate the "
                                 "model in Python with that shape (FitResult.calculated of the fit itself)")
            if symbols is None:
                raise ValueError("the fit has a Compton term: give symbols= (the primitive cell's chemical symbols) "
                                 "to rebuild its shape")
            from .background import ComptonShape

            shape = ComptonShape(list(symbols))
        return cls(labels=[p["label"] for p in params], theta=np.array([p["value"] for p in params], dtype=float),
                   sigma=sigma, covariance=correlation * np.outer(sigma, sigma), correlation=correlation,
                   scale=float(saved["scale"]), background=float(saved["background"]), chi2=float(saved["chi2"]),
                   chi2_red=float(saved["chi2_red"]), n_points=int(saved["n_points"]),
                   iterations=int(saved["iterations"]), settings=settings, warnings=list(saved.get("warnings", [])),
                   compton=saved.get("compton"), deviance=saved.get("deviance"), compton_shape=shape,
                   model_error=dict(saved.get("model_error") or {}), status=dict(saved.get("status") or {}),
                   combinations=list(saved.get("combinations") or []))

    def table(self) -> str:
        """Plain-text table: label, value and 1σ (eV/Å²) per parameter, then the nuisance values and χ²_red."""
        lines = [f"{'label':<14}{'value':>12}{'1σ':>11}  unit"]
        lines += [f"{k:<14}{v:>12.5f}{s:>11.5f}  eV/Å²" for k, v, s in zip(self.labels, self.theta, self.sigma)]
        compton = "" if self.compton is None else f", Compton amplitude {self.compton:.6g}"
        lines.append(f"scale {self.scale:.6g}, background {self.background:.6g}{compton}, "
                     f"χ²_red {self.chi2_red:.4g} on {self.n_points} points")
        if self.status:
            lines.append(f"{'converged' if self.status['converged'] else 'NOT converged'} after {self.iterations} "
                         f"iterations: {self.status['reason']}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """What fit.json holds: parameters (label, value, 1σ, unit), correlation, nuisances, χ², settings, versions."""
        import ase
        import phonopy

        from . import __version__

        return {
            "parameters": [{"label": k, "value": float(v), "sigma": float(s), "unit": "eV/Å²"}
                           for k, v, s in zip(self.labels, self.theta, self.sigma)],
            "correlation": self.correlation.tolist(),
            "scale": self.scale, "background": self.background, "compton": self.compton,
            "chi2": self.chi2, "chi2_red": self.chi2_red, "deviance": self.deviance, "n_points": self.n_points,
            "iterations": self.iterations, "status": self.status, "settings": self.settings,
            "model_error": self.model_error,
            "combinations": self.combinations,
            "warnings": self.warnings,
            "versions": {"ase_tds": __version__, "torch": torch.__version__, "ase": ase.__version__,
                         "phonopy": phonopy.__version__, "numpy": np.__version__, "python": platform.python_version()},
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
        from .report import write_fit_folder

        write_fit_folder(folder, model, self, data, start=start, reference=reference)


class _Objective:
    """The profiled loss of θ and its gradient, for the optimisers.

    Under torch.distributed each rank holds its shard of the used points (`distributed.shard`) and every sum over
    points is all-reduced. The loss and its gradient are accumulated over chunks of CHUNK_POINTS points, so that
    memory is set by a chunk, not by the number of points: a first pass without autograd gives the intensities
    for the nuisance values β, then each chunk's loss at that β is differentiated on its own (at the optimal β
    this is the gradient of the profiled loss: the envelope theorem).
    """

    def __init__(self, tds: TDSModel, data: TDSData, scale: str, background: str, loss: str,
                 compton=False, exposure=None):
        fc = tds.force_constants
        everywhere = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
        self.fingerprint = _fingerprint(data, everywhere)
        self.n_total = len(everywhere)
        used = everywhere[distributed.shard(len(everywhere))]  # this rank's points (all of them on one process)
        self.tds, self.loss = tds, loss
        if loss == "poisson" and distributed.size() > 1:
            raise ValueError("loss='poisson' runs on one process; shard a chi2 fit over ranks, or run without torchrun")
        as_t = lambda x: torch.as_tensor(np.asarray(x, dtype=float), dtype=fc.dtype, device=fc.device)
        self.q = as_t(data.q[used])
        self.y = as_t(data.intensity[used])
        self.chunks = [slice(k, k + CHUNK_POINTS) for k in range(0, len(used), CHUNK_POINTS)] or [slice(0, 0)]
        self.nuisance = Nuisance(scale, background, compton, np.linalg.norm(data.q[used], axis=1),
                                 fc.primitive.get_chemical_symbols(), fc.dtype, fc.device)
        self.scale_mode, self.background_mode, self.compton = scale, background, compton
        if loss == "poisson":
            self.exposure = as_t(_exposure(data, exposure, used, len(data)))
            self.counts = self.exposure * self.y
            self.w = self.exposure**2 / torch.clamp(self.counts, min=1.0)  # 1/σ², σ = √max(n, 1)/t
        else:
            sigma = data.sigma if data.sigma is not None else np.sqrt(np.maximum(np.abs(data.intensity), 1e-12))
            self.w = 1.0 / as_t(sigma[used]) ** 2
        self.data_w = self.w  # 1/σ² of the data; w may add the model's own error and the sampling model's variance
        self.model_variance = torch.zeros_like(self.w)
        self.levels = None  # the gaussian model's crystal per point (None: its own choice)
        self.n_theta = fc.n_params
        self.prior = None  # (θ₀ (n,), σ_p): the ridge Σ((θ − θ₀)/σ_p)² added to the loss
        self.progress = False  # a progress bar over the chunks of each evaluation
        self._beta = None

    def intensity(self, pick=None) -> torch.Tensor:
        """The model's I (N,) e.u./atom at the used points (or at `pick` of them)."""
        q = self.q if pick is None else self.q[pick]
        if self.tds.method != "gaussian":
            return self.tds(q)
        return self.tds(q, None if self.levels is None else (self.levels if pick is None else self.levels[pick]))

    def add_monte_carlo_variance(self, theta: np.ndarray) -> None:
        """"sampling" with χ²: weights 1/(σ² + (r·I_obs)²), r (N,) the relative Monte-Carlo standard error of the
        fixed-seed estimate at θ (the start): the speckle of S samples, ≈ 1/√S per point, which θ hardly
        changes (unlike the standard error itself, which follows I(θ)). Where the sampled mean is not positive
        (near Bragg peaks) r is the median of the others; r = 0 where the error is exactly 0 (Q = 0). With the
        data's σ alone the fit would chase the fixed samples' speckle where σ is smallest."""
        with torch.no_grad():
            self.tds.force_constants.theta.copy_(torch.as_tensor(theta))
            mean, stderr = self.tds.sampler.intensity(self.tds, self.q)
        positive = mean > 0
        relative = torch.where(positive, stderr / torch.where(positive, mean, 1.0), 0.0)
        typical = distributed.gathered(relative[positive])  # the median of all ranks' points
        typical = typical.median() if len(typical) else relative.new_zeros(())
        relative = torch.where(positive | (stderr == 0), relative, typical)
        self.w = 1.0 / (1.0 / self.w + (relative * self.y) ** 2)

    @torch.no_grad()
    def profile(self, intensity: torch.Tensor) -> torch.Tensor:
        """The best nuisance values β (k,) at a model intensity (N_local,) of this rank's points (all ranks'
        normal equations summed for χ²; Poisson on one process)."""
        if self.loss == "chi2":
            fixed, x = self.nuisance.design(intensity)
            if not self.nuisance.names:
                return x.new_zeros(0)
            xw = x * self.w[:, None]
            return torch.linalg.solve(distributed.total(xw.T @ x), distributed.total(xw.T @ (self.y - fixed)))
        self._beta = self.nuisance.poisson(intensity, self.counts, self.exposure, start=self._beta)
        return self._beta

    def value(self, model: torch.Tensor, pick=slice(None)) -> torch.Tensor:
        """This rank's loss of the model intensities `model` at its points `pick` (a scalar tensor)."""
        if self.loss == "chi2":
            return (self.w[pick] * (model - self.y[pick]) ** 2).sum()
        return poisson_deviance(self.counts[pick], self.exposure[pick] * torch.clamp(model, min=1e-300))

    def evaluate(self, theta: np.ndarray):
        """(loss, ∂loss/∂θ (n,), β) at θ, summed over chunks and ranks; raises UnstableError where the crystal is
        unstable."""
        fc = self.tds.force_constants
        with torch.no_grad():
            fc.theta.copy_(torch.as_tensor(theta))
        fc.theta.grad = None
        if len(self.chunks) == 1:  # one pass: the intensities keep their graph
            intensity = self.intensity()
            beta = self.profile(intensity.detach())
            value = self.value(self.nuisance.model(intensity, beta))
            value.backward()
        else:
            with torch.no_grad():
                intensity = torch.cat([self.intensity(chunk) for chunk in self.chunks])
            beta = self.profile(intensity)
            value = 0.0
            chunks = tqdm(self.chunks, desc="evaluation (chunks)", leave=False, disable=not self.progress)
            with self.tds.covariance_once():  # the covariance's backward once, not once per chunk
                for chunk in chunks:  # each chunk's graph is freed before the next is built
                    part = self.value(self.nuisance.model(self.intensity(chunk), beta, chunk), chunk)
                    part.backward()
                    value = value + part.detach()
        grad = distributed.total(fc.theta.grad.detach().cpu().numpy().copy())
        value = distributed.total(float(torch.as_tensor(value).detach()))
        if self.prior is not None:
            centre, width = self.prior
            value += float(np.sum(((theta - centre) / width) ** 2))
            grad += 2 * (theta - centre) / width**2
        return value, grad, beta.detach().cpu().numpy()


def _exposure(data: TDSData, exposure, used, n_points: int) -> np.ndarray:
    """t (N_used,): counts per unit of intensity at the points `used` (indices), so that the counts are n = t·I_obs."""
    y = data.intensity[used]
    if np.any(y < 0):
        raise ValueError(f"loss='poisson' needs intensities ≥ 0 (counts/exposure); {int((y < 0).sum())} used points "
                         "are negative: use loss='chi2' for background-subtracted data")
    if exposure is not None:
        t = np.asarray(exposure, dtype=float)
        if t.ndim and t.shape != (n_points,):
            raise ValueError(f"exposure must be one number or one per point, shape ({n_points},); got {t.shape}")
        t = np.broadcast_to(t, (n_points,))[used]
        if not np.all(np.isfinite(t) & (t > 0)):
            raise ValueError("exposure (counts per unit of intensity) must be finite and > 0")
        return t
    if data.sigma is None:
        raise ValueError("loss='poisson' needs the counts: give exposure= (counts per unit of intensity, one number "
                         "or one per point) or data whose σ is the counting error √n/exposure")
    sigma = data.sigma[used]
    return np.where(y > 0, y / np.where(y > 0, sigma, 1.0) ** 2, 1.0 / sigma)


def fit(model, data: TDSData, *, temperature: float | None = None, method: str = "gaussian",
        statistics: str = "quantum", scale: str | None = None, background: str = "free", compton=False,
        loss: str = "chi2", exposure=None, optimizer: str | Optimizer | None = None,
        prior_sigma: float | None = None, checkpoint=None, tds_options: dict | None = None, progress: bool = True,
        max_iter: int | None = None, rtol: float | None = None, gtol: float | None = None,
        learning_rate: float | None = None) -> FitResult:
    """Fit `model` (a ForceConstantModel, fitted in place from its current θ) to `data`; options by keyword.

    Model of the data: s·I(Q; θ) + b + A·c(|Q|) (module docstring); the nuisance values are eliminated at every θ.

    Args:
        model (ForceConstantModel): the model to fit; its θ is the start and holds the fitted values afterwards.
        data: the TDSData; its mask selects the points used.
        temperature: K; None = the data's own temperature (`TDSData.temperature`).
        method: the forward model, "gaussian" (all orders, converged by default) | "one-phonon" | "sampling".
        statistics: "quantum" | "classical".
        scale: "free" | "fixed" (needs absolute data, units "e.u./atom") | None (fixed for absolute data, free
            otherwise).
        background: "free" (a constant) | "none".
        compton (bool | Callable): False | True (Hubbell's incoherent scattering of the crystal's atoms,
            `ComptonShape`, with a free amplitude) | callable(|Q| Å⁻¹ ndarray) → e.u./atom (e.g.
            `ComptonShape(symbols, energy_kev=20)`).
        loss: "chi2" | "poisson". The Poisson deviance needs the counts n = t·I_obs.
        exposure (float | array_like | None): t (counts per unit of intensity, scalar or (N,)) for
            loss="poisson"; None infers t = I_obs/σ² per point, exact when σ is pure counting error √n/t (as
            `add_poisson_noise` writes), and t = 1/σ where I_obs = 0 (its σ = 1 count convention).
        optimizer (Optimizer | str | None): an `Optimizer` (method, max_iter, rtol, gtol, learning_rate), its
            method alone ("lbfgs" | "adam"), or None (L-BFGS, Adam for "sampling"; 200 iterations).
        prior_sigma: eV/Å², a ridge towards the start θ₀: Σ_k ((θ_k − θ₀_k)/prior_sigma)² is added to the loss
            (and 1/prior_sigma² to the Gauss–Newton matrix), so that combinations the data do not determine stay
            near the start (their 1σ then ≈ prior_sigma) while the determined ones converge. None: no prior. Either
            way the fit names the combinations the data alone leave undetermined (`FitResult.combinations`).
        checkpoint (str | Path | None): a JSON file written after every iteration; if it exists, the fit resumes
            from it (same model labels, settings and data, else ValueError): L-BFGS restarts its memory there,
            Adam continues exactly.
        tds_options: extra TDSModel arguments (grid, accuracy, dw_mesh, form_factors, sampler, ...). The gaussian
            model chooses its grid for the data's largest |Q| (`converged_grid`) and estimates its own error on
            every point (`TDSModel.discretisation_error`); a point where it exceeds a fifth of σ moves to a larger
            crystal (at most twice), and what remains is added to the variance of every point (a warning says so;
            `FitResult.model_error` records it). The 1σ carry twice the error at the fitted θ as one error shared
            by all points (the shift it gives θ), which more points do not average away. For "sampling" give a
            sampler with a seed (common random numbers make the loss a smooth function of θ), and many samples
            rather than many points: points with one q of the supercell share its sampled modes (a warning says 1σ
            takes the points' errors as independent).
        progress: progress bars (tqdm) for the iterations and, for large data, the chunks of each evaluation.
        max_iter: deprecated: `Optimizer(max_iter=...)`.
        rtol: deprecated: `Optimizer(rtol=...)`.
        gtol: deprecated: `Optimizer(gtol=...)`.
        learning_rate: deprecated: `Optimizer(learning_rate=...)`.

    Returns:
        FitResult: θ, 1σ (Gauss–Newton sandwich, the model's own error and misfit included), correlations, what
        the data determine, χ² and the settings; `model.theta` holds the fitted values.

    Raises:
        UnstableError: the start is dynamically unstable.
        ValueError: an unknown option, too few points for the parameters, a checkpoint of another fit, or data
            that cannot take the options (e.g. scale="fixed" on data in arbitrary units).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    optimizer = _optimizer_settings(optimizer, max_iter=max_iter, rtol=rtol, gtol=gtol,
                                    learning_rate=learning_rate).for_method(method)
    if prior_sigma is not None and not (np.isfinite(prior_sigma) and prior_sigma > 0):
        raise ValueError(f"prior_sigma must be a positive width in eV/Å² (or None: no prior), got {prior_sigma!r}")
    if scale is None:
        scale = "fixed" if data.absolute else "free"
    if scale not in ("fixed", "free"):
        raise ValueError(f"scale must be 'fixed', 'free' or None (fixed for absolute data), got {scale!r}")
    if scale == "fixed" and not data.absolute:
        raise ValueError("scale='fixed' needs absolute data (units 'e.u./atom'); the data are in arbitrary units — "
                         "use scale='free'")
    if data.cell is not None:
        data.check_cell(model.unitcell.cell[:], "the model's structure")
    temperature = data.require_temperature(temperature)
    sampler = (tds_options or {}).get("sampler")
    if method == "sampling" and distributed.size() > 1 and sampler is not None and sampler.seed is None:
        raise ValueError("under torchrun every rank must draw the same displacements: give the sampler a seed "
                         "(e.g. QSpaceSampler(..., seed=0)), or run without torchrun")
    progress = progress and distributed.is_main()
    options = dict(tds_options or {})
    options.setdefault("q_max", float(data.q_norm[np.asarray(data.mask, dtype=bool)].max()))
    original = model.theta.detach().cpu().numpy().copy()
    try:  # the gaussian model chooses its grid at the start θ, and estimates its error there
        tds = TDSModel(model, temperature, method=method, statistics=statistics, **options)
        objective = _Objective(tds, data, scale, background, loss, compton, exposure)
        n_free = model.n_params + objective.nuisance.n_free
        if objective.n_total <= n_free:
            raise ValueError(f"only {objective.n_total} data points are used for {model.n_params} parameters "
                             f"(+ {objective.nuisance.n_free} nuisance); widen the mask or use fewer shells")
        model_error = _control_model_error(objective)
    except UnstableError as err:
        raise _unstable_start(model, original, original, err, "") from err
    tds = objective.tds
    objective.progress = progress and len(objective.chunks) >= 5  # an evaluation of ≥ 10⁵ points takes seconds
    if prior_sigma is not None:
        objective.prior = (original.copy(), float(prior_sigma))
    if method == "sampling" and tds.sampler.seed is None:
        warnings.warn("the sampler has no seed: every evaluation draws new displacements, so the loss is noisy and "
                      "Adam anneals on that noise; give it a seed (common random numbers) for a smooth loss",
                      stacklevel=2)
    settings = dict(tds.settings(), scale=scale, background=background,
                    compton=compton if isinstance(compton, bool) else "callable", loss=loss, optimizer=optimizer.method,
                    prior_sigma=prior_sigma, data=objective.fingerprint)
    if method == "sampling":  # what redraws the fitted model (and what a checkpoint must match)
        sampler = tds.sampler
        seed = None if sampler.seed is None else int(sampler.seed)
        settings["sampler"] = dict(kind=type(sampler).__name__, supercell=list(sampler.supercell),
                                   n_samples=sampler.n_samples, seed=seed)
    saver = Checkpoint(checkpoint, model.labels, settings) if checkpoint is not None else None
    state = saver.load() if saver is not None else None
    if state and progress:
        tqdm.write(f"resuming from iteration {state['iterations']} of {checkpoint}")
    first_fit = None
    if not state and method != "sampling":
        try:
            first_fit = _first_fit(objective, data, exposure, optimizer, progress)
        except UnstableError as err:  # the one-phonon model meets an unstable start only here
            raise _unstable_start(model, original, original, err, "") from err
        settings = dict(settings, first_fit=first_fit) if first_fit else settings  # for the record, not the checkpoint
    start = state["theta"] if state else model.theta.detach().cpu().numpy().copy()  # the first fit's θ, if any
    try:
        if method == "sampling" and loss == "chi2":
            at = state.get("monte_carlo_theta") if state else None
            at = np.asarray(start if at is None else at, dtype=float)
            objective.add_monte_carlo_variance(at)
            if saver is not None:
                saver.monte_carlo_theta = at
        value0 = objective.evaluate(start)[0]
    except UnstableError as err:
        where = f" (θ from the checkpoint {checkpoint})" if state else " (θ of the first fit)" if first_fit else ""
        raise _unstable_start(model, start, original, err, where) from err
    with _fixed_noise(tds):
        whiten = state["whitening"] if state and state.get("whitening") is not None else _whitening(objective, start)
    run = _Run(whiten=whiten, done=state["iterations"] if state else 0,
               history=state["history"] if state and state["history"] else [value0], saver=saver, progress=progress)
    theta, iterations, status = _minimise(objective, start, optimizer, run, state.get("adam") if state else None)
    history = run.history
    with _fixed_noise(tds):
        return _result(model, tds, objective, theta, iterations, history, settings, compton, model_error, status)


def _first_fit(objective: _Objective, data: TDSData, exposure, optimizer: Optimizer, progress: bool) -> dict | None:
    """Fit a random subset of `optimizer.first_fit_points` of the used points (the same on every rank and run), when
    there are more than twice as many, with the loss of all the points (`objective`: its model, grid, nuisance
    terms and prior; crystals and weights chosen by the same rule at the same θ); the model's θ ends at the
    subset's minimum. Returns {points, iterations, status} of the first fit, or None when there is none.

    Raises:
        ValueError: first_fit_points not above the number of free parameters.
    """
    used = np.flatnonzero(np.asarray(data.mask, dtype=bool))
    n = optimizer.first_fit_points
    if n is None or len(used) <= 2 * n:
        return None
    n_free = objective.n_theta + objective.nuisance.n_free
    if n <= n_free:
        raise ValueError(f"first_fit_points ({n}) must be more than the {n_free} free parameters; give a larger "
                         "number, or None (--first-fit-points 0) for no first fit")
    chosen = np.sort(np.random.default_rng(0).choice(used, n, replace=False))
    if exposure is not None and np.ndim(exposure):  # one per point (checked by the loss of all the points)
        exposure = np.asarray(exposure)[chosen]
    subset = _Objective(objective.tds, data.select(chosen), objective.scale_mode, objective.background_mode,
                        objective.loss, objective.compton, exposure)
    with warnings.catch_warnings():  # the loss of all the points has warned about the model's own error
        warnings.simplefilter("ignore")
        _control_model_error(subset)
    subset.prior, subset.progress = objective.prior, objective.progress and len(subset.chunks) >= 5
    fc = objective.tds.force_constants
    start = fc.theta.detach().cpu().numpy().copy()
    run = _Run(whiten=_whitening(subset, start), done=0, history=[subset.evaluate(start)[0]], saver=None,
               progress=progress, label=f"first fit, {n} of {len(used)} points")
    theta, iterations, status = _minimise(subset, start, optimizer, run)
    with torch.no_grad():
        fc.theta.copy_(torch.as_tensor(theta))
    return {"points": n, "iterations": int(iterations), "status": status}


def _minimise(objective, start: np.ndarray, optimizer: Optimizer, run: _Run, adam_state: dict | None = None):
    """(θ, iterations, status) of `optimizer.method` from `start` (Adam resumes from `adam_state`)."""
    if optimizer.method == "adam":
        return _adam(objective, start, optimizer, run, adam_state)
    return _lbfgs(objective, start, optimizer, run, rewhiten=lambda theta: _rewhiten(objective, theta))


def _optimizer_settings(optimizer, **deprecated) -> Optimizer:
    """An Optimizer from fit's `optimizer` (an Optimizer, a method name or None) and its deprecated keywords."""
    given = {key: value for key, value in deprecated.items() if value is not None}
    if given:
        warnings.warn(f"fit({', '.join(f'{k}=' for k in given)}...) is deprecated; give "
                      f"optimizer=Optimizer({', '.join(f'{k}=...' for k in given)})", DeprecationWarning, stacklevel=3)
    if isinstance(optimizer, Optimizer):
        return dataclasses.replace(optimizer, **given)
    if optimizer is None or isinstance(optimizer, str):
        return Optimizer(method=optimizer, **given)
    raise TypeError(f"optimizer must be an Optimizer, 'lbfgs', 'adam' or None; got {type(optimizer).__name__}")


# Debye temperatures (K) that `debye_temperature_from_data` tries for a spring start: 100 K to 1600 K, ×√2 apart
DEBYE_CANDIDATES = tuple(100.0 * 2 ** (k / 2) for k in range(9))


def debye_temperature_from_data(model, data: TDSData, temperature: float | None = None, statistics: str = "quantum",
                                n_points: int = 2000) -> float:
    """The Debye temperature (K) whose spring start (`set_from_springs`) best fits `data`: the overall stiffness,
    the direction a fit from springs would otherwise crawl along first.

    Each candidate of DEBYE_CANDIDATES is scored by the profiled χ² (scale fixed for absolute data, else free;
    a free background) of the gaussian model on a coarse periodic crystal (6³, refine=False) at up to `n_points`
    used points; `model` (a ForceConstantModel) is left with the best spring start. For MgB₂ (DFT truth) 800 K
    starts at χ²_red 712 where the default 300 K starts at 1.3·10⁵.

    Args:
        model (ForceConstantModel): the model to start; left at the best candidate's springs.
        data: the TDSData (its used points).
        temperature: K; None = the data's own.
        statistics: "quantum" | "classical".
        n_points: at most this many used points (evenly spaced) score the candidates.

    Returns:
        The best Debye temperature, K.
    """
    temperature = data.require_temperature(temperature)
    used = np.nonzero(np.asarray(data.mask, dtype=bool))[0]
    subset = data.select(used[np.linspace(0, len(used) - 1, min(n_points, len(used))).astype(int)])
    scale = "fixed" if data.absolute else "free"
    lowest = DEBYE_CANDIDATES[0]
    springs = model.set_from_springs(lowest).theta.detach().cpu().numpy().copy()  # θ ∝ T_D²: one shape, scaled
    objective = _Objective(TDSModel(model, temperature, statistics=statistics, grid=(6, 6, 6), refine=False),
                           subset, scale, "free", "chi2")
    scores = {}
    for debye in DEBYE_CANDIDATES:
        model.set_parameters(springs * (debye / lowest) ** 2)
        try:
            with torch.no_grad():
                intensity = objective.intensity()
                scores[debye] = float(objective.value(objective.nuisance.model(intensity, objective.profile(intensity))))
        except UnstableError:
            continue
    best = min(scores, key=scores.get)
    model.set_parameters(springs * (best / lowest) ** 2)
    return best


def _fingerprint(data: TDSData, used) -> str:
    """A short hash of the used points (Q, intensity, σ): a checkpoint of other data is refused."""
    import hashlib

    digest = hashlib.sha256()
    for array in (data.q, data.intensity, data.sigma):
        if array is not None:
            digest.update(np.ascontiguousarray(np.asarray(array, dtype=float)[used]).tobytes())
    return digest.hexdigest()[:16]


def _unstable_start(model, theta, original, err, where: str) -> UnstableError:
    """The error for an unstable start θ, naming its most imaginary mode; `model` keeps `original`."""
    with torch.no_grad():
        model.theta.copy_(torch.as_tensor(theta))
        report = _instability(model)
        model.theta.copy_(torch.as_tensor(original))
    return UnstableError(f"the starting force constants are dynamically unstable{where}: {report} ({err}). "
                         "Start from springs (set_from_springs() / --start springs), a calculator "
                         "(set_from_calculator(calc) / --start emt or calculator:module.Class), a stable phonopy file, "
                         "or scaled-down constants")


# the forward model's own error is kept below this fraction of the data's σ
MODEL_ERROR_FRACTION = 0.2
# the true discretisation error is within this many times the estimate |I(grid) − I(1.5 × grid)|
# (benchmarks/convergence.py: on every point checked, four crystals against 32³ references)
MODEL_ERROR_COVERAGE = 2.0


def _control_model_error(objective) -> dict:
    """Keep the gaussian model's discretisation error δ (`TDSModel.discretisation_error`, at the start θ) below a
    fifth of the data's σ: a point above it moves to the next larger crystal (`TDSModel.forward`'s levels; twice
    at most; never with refine=False, which asks for one periodic crystal), and what remains is added to every
    point's variance (weights and 1σ), with a warning. Returns
    the record kept in FitResult.model_error."""
    tds = objective.tds
    if tds.method != "gaussian":
        return {"estimate": "none", "reason": f"the {tds.method} model has no grid (its Debye–Waller mesh is "
                                              "extrapolated; sampling carries its Monte-Carlo error)"}
    sigma = 1.0 / torch.sqrt(objective.data_w)
    with torch.no_grad():
        intensity = tds(objective.q)
        scale = abs(objective.nuisance.values(objective.profile(intensity))["scale"])
    levels = tds.levels(objective.q)
    delta = scale * tds.discretisation_error(objective.q, levels)  # in data units
    promoted = torch.zeros_like(levels, dtype=torch.bool)
    for _ in range(2 if tds.refine else 0):  # refine=False: one periodic crystal, as asked; δ goes to the variance
        move = (delta > MODEL_ERROR_FRACTION * sigma) & (levels < len(GRID_FACTORS) - 1)
        if not move.any():
            break
        levels = levels + move
        promoted |= move
        pick = torch.nonzero(move)[:, 0]
        delta[pick] = scale * tds.discretisation_error(objective.q[pick], levels[pick])
    above = int(distributed.total(float((delta > MODEL_ERROR_FRACTION * sigma).sum())))
    objective.levels = levels
    objective.model_variance = delta**2
    objective.w = 1.0 / (1.0 / objective.w + objective.model_variance)
    record = _model_error_record(delta / scale, intensity, sigma / scale)
    record["points_on_larger_crystals"] = int(distributed.total(float(promoted.sum())))
    if above:
        warnings.warn(f"the forward model's own error exceeds a fifth of σ on {above} of {objective.n_total} points "
                      f"(largest {record['max_over_sigma']:.2g} σ) after moving them to larger crystals (twice at "
                      "most); it is added to their variance. A finer model: tds_options=dict(accuracy=...) or a "
                      "larger grid", stacklevel=3)
    return record


def _model_error_record(delta, intensity, sigma) -> dict:
    """delta, intensity (N,) e.u./atom; sigma (N,) the data's σ in e.u./atom (divided by the scale); of this rank's
    points (the record is of all ranks' points)."""
    delta, intensity, sigma = (distributed.gathered(x) for x in (delta, intensity, sigma))
    relative = (delta / torch.clamp(torch.abs(intensity), min=1e-300)).cpu().numpy()
    over = (delta / sigma).cpu().numpy()
    return {"estimate": "|I(grid) − I(1.5 × grid)|", "median_relative": float(np.median(relative)),
            "max_relative": float(relative.max()), "max_over_sigma": float(over.max()),
            "fraction_above_fifth_sigma": float((over > MODEL_ERROR_FRACTION).mean())}


def _lbfgs(objective, start: np.ndarray, optimizer: Optimizer, run: _Run, rewhiten=None):
    """L-BFGS-B on x = Rθ (R = run.whiten from the Gauss–Newton matrix: the far shells as visible as the first).

    It runs in rounds of at most ROUND_ITERATIONS iterations; after a full round R is recomputed at the best θ
    (`rewhiten(θ)`), since R from the start can be far from the curvature near the minimum (a single plane of
    data: a long curved valley that L-BFGS crawled along for hundreds of iterations). A line search that stops
    short (e.g. at the unstable region) also starts a new round from the best point, with a fresh memory.
    Returns (θ, iterations, status): θ the lowest loss evaluated (never worse than the start), status
    {"converged": bool, "reason": text} from SciPy's stop and the whitened gradient there.

    Args:
        objective: the fit's `_Objective` (loss and gradient of θ).
        start: θ (n,) eV/Å² to start from.
        optimizer: max_iter, rtol and gtol.
        run: whitening, iterations done, loss history (appended to), checkpoint writer, progress switch.
        rewhiten: θ → R at that θ, for the rounds (None: keep R).
    """
    max_iter, history, saver = optimizer.max_iter, run.history, run.saver
    state = {"value": history[-1], "iterations": run.done, "whiten": run.whiten,
             "unwhiten": np.linalg.inv(run.whiten)}
    if max_iter - run.done <= 0:
        return np.asarray(start, dtype=float), run.done, {"converged": False,
                                                          "reason": f"iteration limit ({max_iter})"}
    best = {"value": np.inf, "theta": np.asarray(start, dtype=float), "grad": None}
    bar = tqdm(total=max_iter, initial=run.done, desc=f"{run.label} (L-BFGS)", disable=not run.progress)

    def fun(x):
        theta = state["unwhiten"] @ x
        try:
            value, grad, _ = objective.evaluate(theta)
        except UnstableError:
            # reject: a large value makes the line search backtrack toward the stable side
            return 1e6 * (abs(state["value"]) + 1.0), np.zeros_like(x)
        state["value"] = value
        grad = state["unwhiten"].T @ grad
        if value < best["value"]:
            best.update(value=value, theta=theta, grad=grad)
        return value, grad

    def callback(xk):
        history.append(state["value"])
        state["iterations"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{state['value']:.6g}")
        if saver is not None:
            saver.write(state["unwhiten"] @ xk, state["iterations"], history, state["whiten"])

    with bar:
        for _ in range(RESTARTS + 1):
            before = best["value"]
            budget = max_iter - state["iterations"]
            res = minimize(fun, state["whiten"] @ best["theta"], jac=True, method="L-BFGS-B", callback=callback,
                           options=dict(maxiter=min(budget, ROUND_ITERATIONS), ftol=optimizer.rtol,
                                        gtol=optimizer.gtol, maxcor=20))
            status = _lbfgs_status(res, best["grad"], max_iter)
            if (res.status not in (1, 2) or status["converged"] or not best["value"] < before
                    or state["iterations"] >= max_iter):
                break
            if res.status == 1 and rewhiten is not None:  # a full round: the curvature at the best point
                state["whiten"] = rewhiten(best["theta"])
                state["unwhiten"] = np.linalg.inv(state["whiten"])
                best["grad"] = None
    if state["iterations"] < max_iter and res.status == 1:  # a round's end, not the limit: not converged
        status = {"converged": False, "reason": f"stalled after {state['iterations']} iterations"}
    theta = best["theta"]
    if saver is not None:
        saver.write(theta, state["iterations"], history, state["whiten"])
    return theta, state["iterations"], status


# L-BFGS starts a new round from the best point after a line search stops short of the minimum, or after
# ROUND_ITERATIONS iterations with the whitening recomputed there (see _lbfgs)
RESTARTS = 10
ROUND_ITERATIONS = 40


def _lbfgs_status(res, grad, max_iter) -> dict:
    """How L-BFGS ended. In whitened coordinates the loss is ≈ |x − x*|², so |∂loss/∂x|/2 is the distance to the
    minimum in standard deviations: below 0.01 a stop of the line search is convergence, not a stall."""
    distance = np.inf if grad is None else float(np.abs(grad).max()) / 2
    message = str(res.message)
    if res.status == 0:
        which = "relative change of the loss" if "REL_REDUCTION" in message else "projected gradient"
        return {"converged": True, "reason": f"{which} below its tolerance"}
    if res.status == 1:
        return {"converged": False, "reason": f"iteration limit ({max_iter}); last step {distance:.2g} σ from the "
                                              "local minimum"}
    if distance <= 0.01:
        return {"converged": True, "reason": f"no lower loss along the search direction, {distance:.1e} σ from the "
                                             "minimum (round-off)"}
    stalled = "stalled at the start: " if res.nit == 0 else "stalled: "
    return {"converged": False, "reason": f"{stalled}the line search found no lower loss ({message}), "
                                          f"{distance:.2g} σ from the local minimum"}


def _adam(objective, start: np.ndarray, optimizer: Optimizer, run: _Run, state: dict | None = None,
          xtol: float = 1e-3, decay: float = 0.5, betas=(0.9, 0.999)):
    """Adam on x = Rθ (whitened: a unit step ≈ one standard deviation), the best iterate returned.

    The step size starts at `optimizer.learning_rate` (None: a quarter of the first gradient's rms, ~1/8 of the
    Gauss–Newton step per coordinate). A step that raises the loss above the best so far, or makes the crystal
    unstable, is undone: back to the best point, moments reset, step size × `decay`. Stops when the step size,
    or the largest whitened gradient component / 2 (the distance to the minimum of the local quadratic), is
    below `xtol`, or at `optimizer.max_iter`.

    Args:
        objective: the fit's `_Objective`.
        start: θ (n,) eV/Å² to start from.
        optimizer: max_iter and learning_rate.
        run: whitening, iterations done, loss history (appended to), checkpoint writer, progress switch.
        state: Adam's state from a checkpoint (None: a fresh start).
        xtol: the stop, in standard deviations.
        decay: the step size's factor after an undone step.
        betas: Adam's moment decay rates.

    Returns:
        (θ (n,), iterations, status {"converged": bool, "reason": text}).
    """
    whiten, history, saver, max_iter = run.whiten, run.history, run.saver, optimizer.max_iter
    unwhiten = np.linalg.inv(whiten)
    n = len(start)
    if state is None:
        x = whiten @ np.asarray(start, dtype=float)
        state = dict(x=x, m=np.zeros(n), v=np.zeros(n), t=0, lr=optimizer.learning_rate, best_value=np.inf,
                     best_x=x.copy(), converged=False)
    state = {k: (np.array(v, dtype=float) if isinstance(v, list) else v) for k, v in state.items()}

    def restart():
        lr = None if state["lr"] is None else state["lr"] * decay
        state.update(x=state["best_x"].copy(), m=np.zeros(n), v=np.zeros(n), t=0, lr=lr)

    iterations = run.done
    with tqdm(total=max_iter, initial=run.done, desc=f"{run.label} (Adam)", disable=not run.progress) as bar:
        while iterations < max_iter and not state["converged"]:
            iterations += 1
            bar.update(1)
            try:
                value, grad, _ = objective.evaluate(unwhiten @ state["x"])
            except UnstableError:
                value, grad = np.inf, None
            history.append(value)
            if value > state["best_value"]:
                restart()
            else:
                g = unwhiten.T @ grad
                if state["lr"] is None:
                    state["lr"] = 0.25 * np.linalg.norm(g) / np.sqrt(n)
                state.update(best_value=value, best_x=state["x"].copy())
                if np.abs(g).max() < 2 * xtol:
                    state["converged"] = True
                else:
                    state["t"] += 1
                    state["m"] = betas[0] * state["m"] + (1 - betas[0]) * g
                    state["v"] = betas[1] * state["v"] + (1 - betas[1]) * g**2
                    m_hat = state["m"] / (1 - betas[0] ** state["t"])
                    v_hat = np.sqrt(state["v"] / (1 - betas[1] ** state["t"]))
                    state["x"] = state["x"] - state["lr"] * m_hat / (v_hat + 1e-12 * v_hat.max())
            state["converged"] = bool(state["converged"] or (state["lr"] is not None and state["lr"] < xtol))
            bar.set_postfix(loss=f"{state['best_value']:.6g}", step=f"{state['lr'] or 0:.3g}")
            if saver is not None:
                saver.write(unwhiten @ state["best_x"], iterations, history, whiten, adam=state)
    status = ({"converged": True, "reason": f"step or gradient below {xtol} σ"} if state["converged"]
              else {"converged": False, "reason": f"iteration limit ({max_iter})"})
    return unwhiten @ state["best_x"], iterations, status


@contextlib.contextmanager
def _fixed_noise(tds):
    """For finite differences of the sampling model: common random numbers (a seed) while inside."""
    sampler = getattr(tds, "sampler", None)
    if tds.method != "sampling" or sampler.seed is not None:
        yield
        return
    sampler.seed = 0
    try:
        yield
    finally:
        sampler.seed = None


@torch.no_grad()
def _jacobian(objective, theta: np.ndarray, pick=None) -> torch.Tensor:
    """∂I/∂θ (B, n_params) at θ by central differences (steps 1e-4·max(|θ_k|, 0.01) eV/Å²), at the used points
    (or `pick` of them)."""
    fc = objective.tds.force_constants
    fc.theta.copy_(torch.as_tensor(theta))
    columns = []
    for k in range(fc.n_params):
        step = torch.zeros_like(fc.theta)
        step[k] = 1e-4 * max(abs(theta[k]), 1e-2)
        fc.theta.add_(step)
        plus = objective.intensity(pick)
        fc.theta.sub_(2 * step)
        minus = objective.intensity(pick)
        fc.theta.add_(step)
        columns.append((plus - minus) / (2 * step[k]))
    return torch.stack(columns, dim=1)


def _rewhiten(objective, theta: np.ndarray) -> np.ndarray:
    with _fixed_noise(objective.tds):
        return _whitening(objective, theta)


def _whitening(objective, theta: np.ndarray, n_points: int = 256) -> np.ndarray:
    """R (n, n) with RᵀR ≈ the Gauss–Newton matrix at θ on a subset of points: x = Rθ is well scaled.

    Directions the data barely see (a mirror-plane slice hides some) get at least 10⁻⁶ of the curvature of the
    best-determined one: with less, a unit step in x ran so far along them that the crystal became unstable and
    the first line search stalled. The preconditioning moves the path, not the minimum."""
    n_total = objective.n_total
    chosen = np.linspace(0, n_total - 1, min(n_points, n_total)).astype(int)  # over all ranks' points
    mine = distributed.shard(n_total)
    pick = torch.as_tensor(chosen[(chosen >= mine[0]) & (chosen <= mine[-1])] - mine[0] if len(mine) else [],
                           dtype=torch.int64)
    normal = np.zeros((len(theta), len(theta)))
    if len(pick):
        jac = _jacobian(objective, theta, pick) * torch.sqrt(objective.w[pick])[:, None]
        normal = (jac.T @ jac).cpu().numpy()
    normal = distributed.total(normal)
    if objective.prior is not None:  # the prior's curvature, on the subset's footing
        normal += len(chosen) / n_total / objective.prior[1] ** 2 * np.eye(len(normal))
    normal += 1e-6 * np.linalg.eigvalsh(normal)[-1] * np.eye(len(normal))
    return np.linalg.cholesky(normal).T


def _result(model, tds, objective, theta, iterations, history, settings, compton, model_error, status) -> FitResult:
    """Final evaluation; Gauss–Newton covariance from a central-difference Jacobian of I(Q; θ) and the nuisance.

    Covariance as a sandwich (JᵀWJ)⁻¹ (JᵀWVWJ + ggᵀ) (JᵀWJ)⁻¹, W the fit's weights and V the variance of the
    residuals: the data's, plus for "sampling" the fixed-seed estimate's Monte-Carlo variance (s·stderr)² (also in
    χ²). g = JᵀW·e carries the gaussian model's own error e = 2·s·(I(grid) − I(1.5 × grid)), one error shared by
    all points (θ moves by (JᵀWJ)⁻¹g), which no number of points averages away. Where W = V⁻¹ and e = 0 this is
    (JᵀWJ)⁻¹.
    """
    fc, nuisance = model, objective.nuisance
    with torch.no_grad():
        fc.theta.copy_(torch.as_tensor(theta))
        if tds.method == "sampling":
            intensity, stderr = tds.sampler.intensity(tds, objective.q)
        else:
            intensity, stderr = objective.intensity(), None
        beta = objective.profile(intensity)
        calc = nuisance.model(intensity, beta)
        values = nuisance.values(beta)
        deviance = None
        if objective.loss == "poisson":
            deviance = distributed.total(float(objective.value(calc)))
            fit_variance = scatter = torch.clamp(calc, min=1e-300) / objective.exposure  # Poisson: var(I_obs) = m/t
            model_variance = 0.0
        else:  # the scatter is the data's; χ² also counts the model's own error, as the weights do
            fit_variance, scatter, model_variance = 1.0 / objective.w, 1.0 / objective.data_w, objective.model_variance
        if stderr is not None:
            scatter = scatter + (values["scale"] * stderr) ** 2
        chi2 = distributed.total(float(((calc - objective.y) ** 2 / (scatter + model_variance)).sum()))
        jac = torch.cat([values["scale"] * _jacobian(objective, theta), nuisance.design(intensity)[1]], dim=1)
        weighted = jac / fit_variance[:, None]
        normal = distributed.total((jac.T @ weighted).cpu().numpy())
        # the model's own error does not scatter from point to point: it enters once, as the shift it gives θ
        middle = distributed.total((weighted.T @ (weighted * scatter[:, None])).cpu().numpy())
        systematic = np.zeros(len(normal))
        if tds.method == "gaussian":
            shift = tds.discretisation_error(objective.q, objective.levels, signed=True)  # at the fitted θ
            error = MODEL_ERROR_COVERAGE * values["scale"] * shift  # data units
            systematic = distributed.total((weighted.T @ error).cpu().numpy())  # JᵀW·error: θ moves by N⁻¹ of it
    n_free = jac.shape[1]
    n_points = objective.n_total
    n = fc.n_params
    combinations = parameter_combinations(fc.labels, theta, _profiled(normal, n))  # what the data alone determine
    if objective.prior is not None:  # the prior acts as one more measurement of each θ_k, of variance σ_p²
        precision = np.zeros(n_free)
        precision[:n] = 1.0 / objective.prior[1] ** 2
        normal, middle = normal + np.diag(precision), middle + np.diag(precision)
    statistical = _sandwich(normal, middle)[:n, :n]
    model_part = _sandwich(normal, middle + np.outer(systematic, systematic))[:n, :n] - statistical
    misfit = _misfit(chi2, max(n_points - n_free, 1))
    if misfit:  # the residuals say the data's σ (and so the noise's 1σ) are too small: scale by χ²_red (Birge)
        statistical = statistical * chi2 / max(n_points - n_free, 1)
    cov = statistical + model_part
    share = np.diag(model_part) / np.where(np.diag(cov) > 0, np.diag(cov), 1.0)  # of each θ_k's variance
    sigma = np.sqrt(np.clip(np.diag(cov), 0, None))
    corr = cov / np.outer(np.where(sigma > 0, sigma, 1), np.where(sigma > 0, sigma, 1))
    notes = _identifiability(fc.labels, corr, normal, objective.scale_mode, combinations, objective.prior)
    notes += [misfit] if misfit else []
    if tds.method == "sampling":
        distinct = tds.sampler.distinct_q(torch.stack([distributed.gathered(objective.q[:, k]) for k in range(3)], 1))
        if distinct < n_points:
            notes.append(f"sampling: {n_points} points on {distinct} distinct q of the supercell "
                         f"({n_points / distinct:.1f} per q); points with one q share its sampled modes, which 1σ "
                         "treats as independent, so 1σ can understate the error of θ: many points per q need many "
                         "samples")
    if tds.method == "gaussian":  # the model's own error at the fitted θ, for the record
        final = _model_error_record(torch.abs(shift), intensity, 1.0 / torch.sqrt(objective.data_w)
                                    / abs(values["scale"]))
        final["largest_share_of_variance"] = float(np.clip(share, 0.0, 1.0).max())
        if final["fraction_above_fifth_sigma"] > model_error.get("fraction_above_fifth_sigma", 0.0):
            notes.append(f"at the fitted θ the model's own error exceeds a fifth of σ on "
                         f"{final['fraction_above_fifth_sigma']:.2%} of the points (largest "
                         f"{final['max_over_sigma']:.2g} σ; the grid and crystals were chosen at the start θ); the "
                         "1σ carry it. A finer model: fit again from this θ (the grid and crystals are chosen there), "
                         "or a smaller accuracy")
        model_error = dict(model_error, at_start=dict(model_error), **final)
        model_error["at_start"].pop("estimate", None)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    shape = None
    if values["compton"] is not None:
        from .background import ComptonShape

        shape = ComptonShape(fc.primitive.get_chemical_symbols()) if compton is True else compton
    return FitResult(labels=list(fc.labels), theta=np.asarray(theta, dtype=float), sigma=sigma, covariance=cov,
                     combinations=combinations,
                     correlation=corr, scale=values["scale"], background=values["background"], chi2=chi2,
                     chi2_red=chi2 / max(n_points - n_free, 1), n_points=n_points, iterations=iterations,
                     settings=settings, warnings=notes, history=[float(h) for h in history],
                     compton=values["compton"], deviance=deviance, compton_shape=shape, model_error=model_error,
                     status=status)


# directions of the (diagonally scaled) Gauss–Newton matrix below this fraction of its largest eigenvalue count as
# undetermined: their variance is at least 1/(CONDITION_FLOOR · λ_max), never the 0 of a pseudo-inverse
CONDITION_FLOOR = 1e-12


def _sandwich(normal: np.ndarray, middle: np.ndarray) -> np.ndarray:
    """N⁻¹ M N⁻¹ (k, k), honest where N is singular: a direction the data do not see gets a huge variance.

    A pseudo-inverse would give such a direction variance 0, i.e. a parameter the data cannot determine reported
    with a tiny 1σ (10³σ from the truth, seen on data along one line). Computed in the scaled basis D⁻¹ N D⁻¹,
    D = √diag N, so that the floor does not depend on the units of θ and of the nuisance values.
    """
    d = np.sqrt(np.clip(np.diag(normal), 0, None))
    d = np.where(d > 0, d, 1.0)
    scaled = normal / np.outer(d, d)
    lam, vectors = np.linalg.eigh((scaled + scaled.T) / 2)
    floor = CONDITION_FLOOR * max(lam[-1], 1e-300)
    inverse = (vectors / np.maximum(lam, floor)) @ vectors.T
    cov = inverse @ (middle / np.outer(d, d)) @ inverse
    unseen = vectors[:, lam < floor]
    cov += unseen @ unseen.T / floor
    return cov / np.outer(d, d)


# χ² more than this many of its standard deviations √(2·dof) above dof: the model does not describe the data
MISFIT_SIGMAS = 5.0


def _misfit(chi2: float, dof: int) -> str:
    """A note when χ² is far above its expectation (and the 1σ are then scaled by √χ²_red), else ""."""
    excess = (chi2 - dof) / np.sqrt(2 * dof)
    if excess <= MISFIT_SIGMAS:
        return ""
    return (f"χ²_red = {chi2 / dof:.3g}, {excess:.0f} standard deviations of χ² above 1: the model misses the data by "
            "more than their σ allow — a local minimum (fit again from another start: springs with another Debye "
            "temperature, or a calculator), understated errors of the data, or physics the model leaves out; "
            f"the 1σ are scaled by √χ²_red = {np.sqrt(chi2 / dof):.3g}")


def _profiled(normal: np.ndarray, n: int) -> np.ndarray:
    """The Gauss–Newton matrix of θ (first n) with the nuisance values eliminated (Schur complement), (n, n)."""
    a, b, c = normal[:n, :n], normal[:n, n:], normal[n:, n:]
    return a - b @ np.linalg.pinv(c) @ b.T if c.size else a


def _identifiability(labels, corr, normal, scale_mode, combinations, prior) -> list[str]:
    notes = []
    for combo in combinations:
        if not combo["determined"]:
            held = (f"the prior (σ_p = {prior[1]:.3g} eV/Å²) holds it near the start" if prior is not None
                    else "a prior (prior_sigma= / --prior-sigma) would hold it near the start")
            size = f"{combo['relative']:.0%}" if combo["relative"] < 10 else f"{combo['relative']:.2g}×"
            notes.append(f"the data do not determine {combo['text']}: 1σ {combo['sigma']:.3g} eV/Å² from the data "
                         f"alone, {size} of the largest constant; {held}")
    if scale_mode == "free":
        notes.append("the intensity scale is free: the overall magnitude of the force constants is then set only "
                     "by the Debye–Waller and multi-phonon terms, and is correlated with the scale")
    eig = np.linalg.eigvalsh(normal)
    if eig[0] <= 1e-12 * eig[-1]:
        notes.append(f"the parameters are (nearly) degenerate: condition number {eig[-1] / max(eig[0], 1e-300):.3g}")
    n = len(labels)
    for i in range(n):
        for j in range(i + 1, n):
            if abs(corr[i, j]) > 0.98:
                notes.append(f"{labels[i]} and {labels[j]} are strongly correlated (ρ = {corr[i, j]:+.3f})")
    return notes


def _instability(model, mesh: int = 8) -> str:
    """Where the model's current θ is unstable: the most imaginary frequency on a Γ-centred mesh³ (text)."""
    q = mesh_q(model, (mesh,) * 3)[1:]  # Γ (three zero modes) left out
    freqs = model.frequencies(q)
    k, band = np.unravel_index(np.argmin(freqs), freqs.shape)
    if freqs[k, band] > -1e-3:
        return (f"no imaginary frequency on a {mesh}×{mesh}×{mesh} mesh, so the instability lies between its points "
                "(long waves, or a q of the sampler's supercell)")
    hkl = reduced_q(q[k].cpu().numpy(), model.unitcell.cell[:])
    count = int((freqs.min(axis=1) < -1e-3).sum())
    return (f"imaginary frequency {-freqs[k, band]:.3f}i THz at hkl = {np.round(hkl, 3).tolist()} (r.l.u. of the "
            f"model's cell), {count} of {len(q)} q of a {mesh}×{mesh}×{mesh} mesh imaginary")
