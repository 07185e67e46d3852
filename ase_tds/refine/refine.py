"""The refinement of a potential's own weights w against TDS: θ(w) = M·F(w) (`projection`), the fit's profiled χ²
of θ (`fitting.objective`) plus the anchor (`anchor`), minimised over w by L-BFGS.

Each evaluation: the forces F of the displaced supercells with their graph kept, θ = M·F, the loss and its gradient
g = ∂χ²/∂θ as in `fit` (the nuisance scale and background profiled), then back into the weights by one
vector–Jacobian product, ∂χ²/∂w = gᵀ·M·∂F/∂w, and the anchor's own gradient added.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

from ..covariance import UnstableError
from ..data import TDSData
from ..fitting.covariance import fitted_result
from ..fitting.fit import checked_options
from ..fitting.objective import Objective, fingerprint, set_theta
from ..fitting.optimizers.lbfgs import stalled
from ..fitting.result import FitResult
from ..forward import tds_model
from ..model import ForceConstantModel
from .anchor import Anchor
from .drift import equation_of_state
from .potentials import Potential, check_potential, load_potential
from .projection import DisplacementProjection
from .reach import TOLERANCE_THZ, far_force_constants, potential_phonopy, truncation

# L-BFGS over float32 forces stops where its line search meets their round-off, often far from the minimum: it starts
# again from the best weights, with a fresh memory, until a round lowers the loss by less than ROUND_GAIN (relative)
ROUND_GAIN = 1e-3
MAX_ROUNDS = 10
# a round also ends where it stalls (`optimizers.lbfgs.stalled`: 3 iterations lower the loss by less than
# STALL_ATOL·(loss per point)): the loss is then within about that of its least value, and the line searches of
# float32 forces gain hundredths of a χ² for minutes (SevenNet-0 on Ni: 90 s per iteration after iteration 85)
STALL_ATOL = 0.1
# SciPy's L-BFGS-B takes a first step of unit length: over raw weights, where one scalar (SevenNet's energy scale) can
# carry most of the gradient, that step remade the crystal and the line search ended at no gain (SevenNet-0 on Si:
# χ² 1.09483e7 → 1.09481e7, "converged"). It runs over y = (w − w_start)/s, s = FIRST_STEP·|w_start|: a first
# step moves the weights by that fraction of their norm, and the steps after it are scaled by L-BFGS's own curvature
FIRST_STEP = 1e-3
# the far term (the pairs past the cutoff, `reach`) is renewed as each round begins, and a round ends after this many
# iterations: SevenNet-0 on Si spent 80 iterations in its first round, its far pairs moving 0.64 THz worth meanwhile
RENEW_EVERY = 20
SAVED_NAMES = {"chgnet": "refined_chgnet.pth.tar", "sevenn": "refined_sevenn.pth"}  # else refined_potential.pt


@dataclass
class RefineResult:
    """A refinement: the data's fit of θ(w) at the refined weights and what moved.

    Attributes:
        fit: the FitResult of θ at the refined weights on the data (1σ of θ through the data's Gauss–Newton matrix,
            as if θ were free: what the data say about the force constants the potential now has).
        theta_start: θ (n_params,) eV/Å² of the pretrained weights.
        phonons: {point: {"q_frac": fractional q of the primitive cell, "start": THz, "refined": THz}} at the
            primitive lattice's special points.
        chi2_start: χ² of the data at the start.
        anchor_drift: `Anchor.drift` at the refined weights.
        equation_of_state: {"start": ..., "refined": ...} (`drift.equation_of_state`): lattice scale, B.
        weights: {"layers", "n_weights", "relative_change"}: what was refined and by how much (‖w − w⁰‖/‖w⁰‖).
        settings: potential, shells, supercell, displacement, anchor sigmas, iterations.
        reach: (`reach.truncation`, at the special points) "past_cutoff": the potential's own phonons at the start
            against θ's alone (the share of the force constants past the cutoff, held fixed in the fit);
            "refined": its own phonons at the end against the fitted model's (how far those moved).
        status: {"converged", "reason"} of the optimiser.
        seconds: wall time of the refinement.
        history: the loss after each iteration.
        start_model: the ForceConstantModel of the pretrained weights (drawn in dispersion.png).
    """

    fit: FitResult
    theta_start: np.ndarray
    phonons: dict
    chi2_start: float
    anchor_drift: dict
    equation_of_state: dict
    weights: dict
    settings: dict
    reach: dict
    status: dict
    seconds: float
    history: list = field(default_factory=list)
    start_model: ForceConstantModel | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """fit.json: the fit's record (`FitResult.to_dict`) with a "refine" section."""
        record = self.fit.to_dict()
        record["refine"] = {
            "theta_start": dict(zip(self.fit.labels, map(float, self.theta_start))),
            "chi2_start": self.chi2_start, "chi2": self.fit.chi2, "phonons_THz": self.phonons,
            "anchor_drift": self.anchor_drift, "equation_of_state": self.equation_of_state, "weights": self.weights,
            "settings": self.settings, "reach": self.reach, "status": self.status, "seconds": self.seconds,
            "history": self.history}
        return record

    def write_json(self, path) -> None:
        """Write `to_dict()` as JSON atomically (`atomic.write_atomic`).

        Args:
            path (str | Path): the file.
        """
        from ..atomic import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    def table(self) -> str:
        """Plain text: the phonons before and after, χ², the lattice and bulk modulus, the anchor drift."""
        lines = [f"{'point':<6}{'start (THz)':>30}{'refined (THz)':>30}"]
        for name, record in self.phonons.items():
            lines.append(f"{name:<6}{np.array2string(np.array(record['start']), precision=3):>30}"
                         f"{np.array2string(np.array(record['refined']), precision=3):>30}")
        eos = self.equation_of_state
        drift = self.anchor_drift
        lines += [f"χ² {self.chi2_start:.6g} → {self.fit.chi2:.6g} (χ²_red {self.fit.chi2_red:.4g} on "
                  f"{self.fit.n_points} points), {self.weights['n_weights']} weights of {self.weights['layers']}, "
                  f"relative change {self.weights['relative_change']:.3g}",
                  f"lattice constant moved {100 * (eos['refined']['lattice_scale'] / eos['start']['lattice_scale'] - 1):+.3f} %, "
                  f"bulk modulus {eos['start']['bulk_modulus_GPa']:.1f} → {eos['refined']['bulk_modulus_GPa']:.1f} GPa",
                  f"anchor drift: energies {drift['energy_rms_meV_per_atom']:.2f} meV/atom rms, forces "
                  f"{drift['force_rms_meV_per_A']:.1f} meV/Å rms (largest {drift['force_max_meV_per_A']:.1f})",
                  f"force constants past the cutoff, held at the start's: {self.reach['past_cutoff']['largest_THz']:.3f}"
                  f" THz of the start's phonons; the refined potential's own phonons (a "
                  f"{self.reach['refined']['supercell_atoms']}-atom supercell) differ from the fitted ones by up to "
                  f"{self.reach['refined']['largest_THz']:.3f} THz",
                  f"{'converged' if self.status['converged'] else 'NOT converged'}: {self.status['reason']}"]
        if not self.fit.trusted:
            lines.append("NOT TRUSTED: the refined potential does not describe the data "
                         f"(χ²_red {self.fit.chi2_red:.3g}): the weights refined, held by the anchor, cannot reach "
                         "them. Refine more layers (--layers, docs/refine.md), loosen the anchor (--energy-sigma, "
                         "--force-sigma), or compare with `ase-tds fit` on the same data to see whether the "
                         "force-constant model itself can")
        return "\n".join(lines)

    def save(self, folder, potential: Potential, model: ForceConstantModel, data: TDSData) -> Path:
        """Write the refined potential (its own format) and the fit folder: phonopy files of θ (the pairs within the
        cutoff, as fit.json's parameters; the far term is the potential's own), fit.json, data.h5, dispersion.png
        (start and refined), tds_fit.png; all or nothing. Returns the potential's file."""
        from ..atomic import write_files
        from ..io.phonopy import phonopy_writers
        from ..plot import plot_dispersion
        from ..report import draw_tds_fit

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        curves = {"refined": model} if self.start_model is None else {"refined": model, "start": self.start_model}
        name = SAVED_NAMES.get(potential.name, "refined_potential.pt")
        writers = dict(phonopy_writers(copy.deepcopy(model).set_far(None)), **{
            name: potential.save,
            "fit.json": self.write_json,
            "data.h5": data.write,
            "dispersion.png": lambda path: plot_dispersion(curves, path, covariance=self.fit.covariance),
            "tds_fit.png": lambda path: draw_tds_fit(model, self.fit, data, path),
        })
        write_files(out, writers)
        return out / name


def special_points(model: ForceConstantModel) -> dict:
    """{name: fractional q (3,) of the primitive cell} of its lattice's special points (ASE's), Γ left out."""
    points = model.primitive.cell.bandpath(npoints=0).special_points
    return {name: np.asarray(q, dtype=float) for name, q in points.items() if name != "G"}


def refine(potential, structure, data: TDSData, *, shells: int | None = 5, cutoff: float | None = None,
           layers=None, temperature: float | None = None, method: str = "gaussian", statistics: str = "quantum",
           scale: str | None = None, background: str = "free", energy_sigma: float | None = None,
           force_sigma: float | None = None, lattice_sigma: float | None = None, weight_sigma: float | None = None,
           n_snapshots: int = 3, max_iter: int = 200, supercell_matrix=None, displacement: float = 0.01,
           tds_options: dict | None = None, device="cpu", progress: bool = True) -> tuple[RefineResult, ForceConstantModel]:
    """Refine `potential`'s weights (in place) so that its force constants fit `data`, anchored to its pretrained self.

    Args:
        potential (Potential | str | torch.nn.Module): what `load_potential` takes ("chgnet", "sevenn",
            "module:Class", a Potential or an nn.Module of forward(positions, atoms) → energy).
        structure (ase.Atoms): the crystal the data's hkl index (e.g. its conventional cell).
        data: the TDSData (its mask: the points used).
        shells: neighbour shells of the force-constant model θ (or `cutoff`, Å).
        layers (list[str] | str | None): name prefixes of the weights refined, "all", or None (the potential's
            `default_layers`: its readout, docs/refine.md).
        temperature: K (None: the data's).
        method, statistics, scale, background: the data's model, as in `fit`.
        energy_sigma: σ_E of the anchor's energies, eV/atom (None: `anchor.ENERGY_SIGMA`).
        force_sigma: σ_F of the anchor's forces, eV/Å (None: `anchor.FORCE_SIGMA`); 0 or less: forces not anchored.
        lattice_sigma: σ_a of the equilibrium lattice constant, relative (None: `anchor.LATTICE_SIGMA`); 0 or less:
            held only through the energies.
        weight_sigma: σ_w of an L2 pull to the pretrained weights (None: none).
        n_snapshots: thermal snapshots among the anchor's configurations.
        max_iter: the most L-BFGS iterations over the weights (it stops earlier when converged).
        supercell_matrix (array_like | None): of the displaced supercells (None: `projection.compact_supercell`).
        displacement: Å, the finite displacement.
        tds_options: forward-model options, as in `fit`.
        device (torch.device | str): where the potential and the data's model compute ("cpu", "cuda", "cuda:N");
            the potential is left there.
        progress: progress bars.

    Returns:
        (RefineResult, ForceConstantModel at the refined θ, on the CPU).

    Raises:
        UnstableError: the pretrained potential's force constants are unstable on this model.
        ValueError: bad options, or a potential that breaks the protocol.
    """
    from . import anchor as anchor_defaults

    t0 = time.time()
    potential = load_potential(potential).to(device)
    model = ForceConstantModel(structure, shells=None if cutoff is not None else shells, cutoff=cutoff)
    scale = checked_options(model, data, method, scale, "chi2", None, tds_options)
    temperature = data.require_temperature(temperature)
    check_potential(potential, model.unitcell)
    parameters = potential.parameters(layers)
    for name, weight in potential.module.named_parameters():
        weight.requires_grad_(name in parameters)
    projection = DisplacementProjection(model, supercell_matrix, displacement, progress=progress)
    theta_start = projection.theta_of(potential).detach().numpy()
    set_theta(model, theta_start)
    short_start = copy.deepcopy(model)  # θ's range alone: the anchor's thermal snapshots are drawn from it
    points = special_points(model)
    q_points = np.array(list(points.values())) @ (2 * np.pi * np.linalg.inv(model.primitive.cell[:]).T)
    own = potential_phonopy(potential, model, displacement)  # the potential's own force constants, once
    reach = {"past_cutoff": truncation(own, short_start, q_points)}
    model.set_far(far_force_constants(own, model))  # renewed each round (docs/refine.md)
    start_model = copy.deepcopy(model)
    model.to(device)
    force_sigma = anchor_defaults.FORCE_SIGMA if force_sigma is None else force_sigma
    lattice_sigma = anchor_defaults.LATTICE_SIGMA if lattice_sigma is None else lattice_sigma
    eos_start = equation_of_state(potential, model.unitcell)
    anchor = Anchor.build(potential, short_start, temperature, parameters, n_snapshots=n_snapshots,
                          lattice_scale=eos_start["lattice_scale"],
                          energy_sigma=energy_sigma or anchor_defaults.ENERGY_SIGMA,
                          force_sigma=force_sigma if force_sigma > 0 else None,
                          lattice_sigma=lattice_sigma if lattice_sigma > 0 else None, weight_sigma=weight_sigma)
    options = dict(tds_options or {})
    options.setdefault("q_max", float(data.q_norm[np.asarray(data.mask, dtype=bool)].max()))
    tds = tds_model(model, temperature, method=method, statistics=statistics, **options)
    objective = Objective(tds, data, scale, background, "chi2", theta=theta_start, progress=progress)
    chi2_start = objective.evaluate(theta_start)[0]

    loss = _WeightLoss(potential, parameters, projection, objective, anchor)
    x0 = loss.vector()
    history, bar = [], tqdm(total=max_iter, desc="refine (L-BFGS over weights)", disable=not progress)

    def tick(x):
        history.append(loss.last)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.last:.6g}", chi2=f"{loss.last_chi2:.6g}")

    status = _minimise(loss, x0, max_iter, history, tick, refresh=lambda x: loss.refresh_far(x, displacement))
    bar.close()
    loss.write(loss.best_x)

    theta = projection.theta_of(potential).detach().numpy()
    settings = dict(tds.settings(), scale=scale, background=background, compton=False, loss="chi2",
                    optimizer="lbfgs (weights)", prior_sigma=None, data=fingerprint(data))
    fit = fitted_result(objective, theta, len(history), history, status, settings, False)
    model.cpu()
    refined_nu = model.frequencies(q_points)
    start_nu = start_model.frequencies(q_points)
    reach["refined"] = truncation(potential_phonopy(potential, model, displacement), model, q_points)
    if reach["refined"]["largest_THz"] > TOLERANCE_THZ:
        text = (
            f"the potential's force constants past the refined range (cutoff {model.cutoff:.3f} Å), held at the "
            f"start's while the data were fitted, moved with the weights: its own phonons differ from those the "
            f"data fitted by up to {reach['refined']['largest_THz']:.3f} THz, an error the χ² and the 1σ cannot "
            "see; refine with more shells (shells= / --shells), which the displaced supercell grows with")
        fit.warnings.append(text)
        warnings.warn(text, stacklevel=2)
    phonons = {name: {"q_frac": points[name].tolist(), "start": start_nu[i].tolist(), "refined": refined_nu[i].tolist()}
               for i, name in enumerate(points)}
    change = np.sqrt(sum(float(((p.detach().cpu() - anchor.weights0[n]) ** 2).sum()) for n, p in parameters.items()))
    norm = np.sqrt(sum(float((w**2).sum()) for w in anchor.weights0.values()))
    result = RefineResult(
        fit=fit, theta_start=theta_start, phonons=phonons, chi2_start=float(chi2_start),
        anchor_drift=anchor.drift(potential),
        equation_of_state={"start": eos_start, "refined": equation_of_state(potential, model.unitcell)},
        weights={"layers": sorted({n.split(".")[0] for n in parameters}), "n_weights": int(x0.size),
                 "relative_change": change / max(norm, 1e-300)},
        settings={"potential": potential.name, "shells": shells, "cutoff": model.cutoff,
                  "supercell_matrix": projection.supercell_matrix.tolist(), "displaced_supercells": len(projection.supercells),
                  "supercell_atoms": projection.n_atoms, "displacement": displacement,
                  "energy_sigma": anchor.energy_sigma, "force_sigma": anchor.force_sigma,
                  "lattice_sigma": anchor.lattice_sigma, "weight_sigma": weight_sigma,
                  "anchor_configurations": len(anchor.configurations), "max_iter": max_iter,
                  "evaluations": loss.evaluations, "dtype": str(next(iter(parameters.values())).dtype)},
        reach=reach, status=status, seconds=time.time() - t0, history=[float(h) for h in history], start_model=start_model)
    return result, model


def _minimise(loss, x0: np.ndarray, max_iter: int, history: list, tick, refresh=None) -> dict:
    """L-BFGS-B over the weights in rounds (ROUND_GAIN; a round ends where it stalls, STALL_ATOL), at most `max_iter`
    iterations in all (`history` counts them); `loss` keeps the best weights; `refresh(x)`, where given, renews the
    loss at the weights x each round begins from (the far term), and a round then ends after RENEW_EVERY iterations.
    Returns the status {"converged", "reason"}."""
    start, rounds = x0, 0
    while True:
        rounds += 1
        if rounds > 1 and refresh is not None:
            refresh(start)
        before, first = loss.best, len(history)

        def iterated(x):
            tick(x)
            if stalled(history[first:], STALL_ATOL, loss.objective.n_total):
                raise StopIteration  # scipy ends the round (status 99)

        step = FIRST_STEP * max(float(np.linalg.norm(start)), 1e-12)

        def scaled(y):
            value, grad = loss(start + step * y)
            return value, step * grad

        cap = max_iter - len(history) if refresh is None else min(max_iter - len(history), RENEW_EVERY)
        res = minimize(scaled, np.zeros_like(start), jac=True, method="L-BFGS-B", callback=iterated,
                       options=dict(maxiter=cap, maxcor=20, ftol=1e-10, gtol=1e-8 * step))
        if len(history) >= max_iter:
            return {"converged": False, "reason": f"iteration limit ({max_iter}) in round {rounds}"}
        if not before - loss.best > ROUND_GAIN * abs(loss.best):
            return {"converged": True, "reason": f"round {rounds} of L-BFGS ({str(res.message).strip()}) lowered the "
                                                 f"loss by less than {ROUND_GAIN:g} of it"}
        if rounds == MAX_ROUNDS and refresh is None:  # rounds of RENEW_EVERY: max_iter bounds them
            return {"converged": False, "reason": f"still lowering the loss after {MAX_ROUNDS} rounds of L-BFGS"}
        start = loss.best_x


class _WeightLoss:
    """The loss of the refined weights as a flat float64 vector (for SciPy): χ²(θ(w)) + anchor(w), its gradient, and
    the lowest loss evaluated. A weight vector whose crystal is unstable gets a large loss (the line search backs off)."""

    def __init__(self, potential, parameters: dict, projection, objective, anchor):
        self.potential, self.parameters = potential, list(parameters.values())
        self.named = parameters
        self.projection, self.objective, self.anchor = projection, objective, anchor
        self.last = self.last_chi2 = np.inf
        self.best, self.best_x, self.evaluations = np.inf, None, 0

    def vector(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in self.parameters]).numpy()

    @torch.no_grad()
    def write(self, x) -> None:
        offset = 0
        for p in self.parameters:
            p.copy_(torch.as_tensor(x[offset:offset + p.numel()]).reshape(p.shape).to(p.device, p.dtype))
            offset += p.numel()

    def refresh_far(self, x, displacement: float) -> None:
        """Recompute the model's far term (`reach.far_force_constants`) at the weights x: the loss changes with it,
        so the best so far is the loss at x."""
        self.write(x)
        model = self.objective.tds.force_constants
        theta = self.projection.theta_of(self.potential).detach().cpu().numpy()
        model.set_far(None)
        set_theta(model, theta)
        model.set_far(far_force_constants(potential_phonopy(self.potential, model, displacement), model))
        self.objective.tds.forget()
        self.best = np.inf
        self(x)

    def __call__(self, x):
        self.evaluations += 1
        self.write(x)
        _, forces = self.potential.energy_forces(self.projection.supercells, create_graph=True)
        theta = self.projection.theta(forces)
        try:
            chi2, grad_theta, _ = self.objective.evaluate(theta.detach().numpy())
        except UnstableError:
            return 1e6 * (abs(self.last) + 1.0), np.zeros_like(x)
        surrogate = theta @ torch.as_tensor(grad_theta, dtype=theta.dtype)  # its gradient: gᵀ·∂θ/∂w
        penalty = self.anchor.penalty(self.potential, self.named)
        grads = torch.autograd.grad(surrogate + penalty, self.parameters, allow_unused=True)
        grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to("cpu", torch.float64)
                          for g, p in zip(grads, self.parameters)]).numpy()
        self.last_chi2 = float(chi2)
        self.last = float(chi2) + float(penalty.detach())
        if self.last < self.best:
            self.best, self.best_x = self.last, x.copy()
        return self.last, grad
