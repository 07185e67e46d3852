"""ase_tds.refine with a torch Morse potential (tests/toy_torch_potential.py): the chain rule, the projection, a
refinement toward another potential's data, the anchor, the saved potential, the command; CHGNet and SevenNet only
where installed (slow). One unanchored refinement (`loose`, module scope) serves the recovery, anchor and save tests."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from ase.build import bulk

from ase_tds import ForceConstantModel
from ase_tds.forward import points_in_sphere, simulate
from ase_tds.refine import check_potential, load_potential, refine
from ase_tds.refine.anchor import Anchor
from ase_tds.refine.projection import DisplacementProjection
from ase_tds.refine.potentials.torch_module import TorchModulePotential
from ase_tds.refine.refine import _WeightLoss
from ase_tds.fitting.objective import Objective
from ase_tds.forward import tds_model
from toy_torch_potential import MorsePotential, StifferMorse

T = 300.0
POINTS = 120  # data points, |Q| ≤ 6 Å⁻¹: three Morse weights are over-determined many times


def nickel():
    return bulk("Ni", "fcc", a=3.52, cubic=True)


@pytest.fixture(scope="module")
def setting():
    """The two-shell model, its displaced supercells, and one-phonon data of the stiffer Morse potential."""
    model = ForceConstantModel(nickel(), shells=2)
    projection = DisplacementProjection(model, progress=False)
    truth = copy.deepcopy(model).set_parameters(projection.theta_of(load_potential(StifferMorse())).detach().numpy())
    rng = np.random.default_rng(5)
    data = simulate(truth, points_in_sphere(truth, POINTS, 6.0, rng), T, method="one-phonon", counts=1e5, rng=rng)
    return model, projection, truth, data.mask_bragg(0.1, truth.primitive.cell[:])


@pytest.fixture(scope="module")
def loose(setting):
    """(potential, RefineResult, model) of `MorsePotential` refined on the data with a negligible anchor (σ_E = 1
    keV/atom, forces and lattice constant free): where the data alone take it."""
    _, _, _, data = setting
    potential = load_potential(MorsePotential())
    result, model = refine(potential, nickel(), data, shells=2, method="one-phonon", energy_sigma=1e3, force_sigma=0,
                           lattice_sigma=0, max_iter=40, progress=False)
    return potential, result, model


def test_projection_equals_set_from_calculator(setting):
    model, projection, _, _ = setting
    potential = load_potential(MorsePotential())
    theta = projection.theta_of(potential).detach().numpy()
    reference = copy.deepcopy(model).set_from_calculator(potential.calculator(), progress=False).theta.detach().numpy()
    # the same displaced forces; the two least-squares routes differ only by the anharmonicity at 0.01 Å
    assert np.abs(theta - reference).max() <= 1e-3 * np.abs(reference).max()


def test_projection_is_exact_for_harmonic_forces(setting):
    model, projection, truth, _ = setting
    fc = truth.to_phonopy(projection.supercell_matrix.T)  # the same supercell, Φ(θ) of the truth
    full = truth.force_constants(fc, "full").detach().numpy()  # (N, N, 3, 3)
    forces = []
    for atoms in projection.supercells:
        u = atoms.positions - fc.supercell.positions
        forces.append(torch.as_tensor(-np.einsum("ijab,jb->ia", full, u)))
    assert np.allclose(projection.theta(forces).numpy(), truth.theta.detach().numpy(), atol=1e-10)


def test_gradient_through_weights_equals_finite_differences(setting):
    model, projection, truth, data = setting
    potential = load_potential(MorsePotential())
    parameters = potential.parameters()
    start = copy.deepcopy(model).set_parameters(projection.theta_of(potential).detach().numpy())
    anchor = Anchor.build(potential, start, T, parameters, n_snapshots=1, weight_sigma=0.05)
    objective = Objective(tds_model(start, T, method="one-phonon"), data, "fixed", "free", "chi2")
    loss = _WeightLoss(potential, parameters, projection, objective, anchor)
    x = loss.vector()
    value, grad = loss(x)
    for k in range(len(x)):
        step = np.zeros_like(x)
        step[k] = 1e-6 * max(abs(x[k]), 1.0)
        numeric = (loss(x + step)[0] - loss(x - step)[0]) / (2 * step[k])
        assert grad[k] == pytest.approx(numeric, rel=1e-5, abs=1e-6 * abs(value))


def test_refinement_recovers_the_other_potentials_phonons(setting, loose):
    _, _, truth, _ = setting
    _, result, model = loose
    q = truth.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0]])
    start_error = np.abs(result.start_model.frequencies(q) - truth.frequencies(q)).max()
    error = np.abs(model.frequencies(q) - truth.frequencies(q)).max()
    assert error < 0.02 * start_error
    assert result.fit.chi2 < 1e-3 * result.chi2_start


def test_the_potentials_own_phonons_are_those_of_its_force_constants(setting, loose):
    """`reach.potential_frequencies` (phonopy on a supercell holding 1.5× the cutoff) equals the model set from the
    potential's ASE calculator (ase_tds's own projection): the Morse pairs end within the two shells, so nothing is
    truncated, and the refinement reports no truncation error."""
    from ase_tds.refine.reach import TOLERANCE_THZ, potential_frequencies

    model, _, truth, _ = setting
    potential = load_potential(MorsePotential())
    q = truth.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0], [0.3, 0.1, 0]])
    own = potential_frequencies(potential, model, q)
    reference = copy.deepcopy(model).set_from_calculator(potential.calculator(), progress=False).frequencies(q)
    assert np.abs(own - reference).max() < 1e-3 * np.abs(reference).max()
    _, result, _ = loose
    assert result.reach["refined"]["largest_THz"] < TOLERANCE_THZ / 10
    assert not any("reach past" in w for w in result.fit.warnings)


def test_far_force_constants_make_the_model_the_potentials_own():
    """θ at one shell plus the potential's force constants past it (`reach.far_force_constants`, held fixed) give
    the potential's own phonons (phonopy's finite displacements): on diamond, two atoms whose phases are not ±1, where
    the far term's atom order and phases must match the model's; without it, the second shell's share is missing."""
    from ase_tds.refine.projection import DisplacementProjection as Projection
    from ase_tds.refine.reach import far_force_constants, potential_frequencies, potential_phonopy

    si = bulk("Si", "diamond", a=5.43, cubic=True)
    potential = load_potential(MorsePotential())
    model = ForceConstantModel(si, shells=1)
    model.set_parameters(Projection(model, progress=False).theta_of(potential).detach().numpy())
    q = model.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0], [0.3, 0.1, 0.05]])
    own = potential_frequencies(potential, model, q)
    short = model.frequencies(q)
    model.set_far(far_force_constants(potential_phonopy(potential, model), model))
    assert np.abs(model.frequencies(q) - own).max() < 1e-6 * np.abs(own).max()
    assert np.abs(short - own).max() > 0.1
    with pytest.raises(ValueError, match="set_far"):
        model.to_phonopy([3, 3, 3])


def test_force_constants_past_the_refined_range_are_held_and_their_drift_reported(setting):
    """Refined at one shell, the Morse potential's second shell is held at the start's in the fit; the weights move
    it, and the refined potential's own phonons then differ from the fitted ones: reported and warned about."""
    _, _, truth, data = setting
    potential = load_potential(MorsePotential())
    with pytest.warns(UserWarning, match="moved with the weights"):
        result, model = refine(potential, nickel(), data, shells=1, method="one-phonon", max_iter=2, progress=False)
    q = truth.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0], [0.75, 0.75, 0]])
    two_shells = ForceConstantModel(nickel(), shells=2).set_from_calculator(potential.calculator(), progress=False)
    expected = np.abs(two_shells.frequencies(q) - model.frequencies(q)).max()
    assert result.reach["refined"]["largest_THz"] == pytest.approx(expected, rel=0.02)
    assert expected > 0.02 and result.reach["past_cutoff"]["largest_THz"] > 0.1
    assert any("moved with the weights" in w for w in result.fit.warnings) and "held at the start's" in result.table()


def test_the_far_term_renewed_each_round_makes_the_potentials_own_phonons_fit(setting):
    """Refined at one shell (the second shell in the far term, renewed at each round of L-BFGS), with a negligible
    anchor: the refined potential's own phonons (its whole force constants, phonopy) come to the truth's, and its
    far term has not moved since the last renewal."""
    from ase_tds.refine.reach import TOLERANCE_THZ, potential_frequencies

    _, _, truth, data = setting
    potential = load_potential(MorsePotential())
    result, model = refine(potential, nickel(), data, shells=1, method="one-phonon", energy_sigma=1e3, force_sigma=0,
                           lattice_sigma=0, max_iter=60, progress=False)
    q = truth.q_from_hkl([[1, 0, 0], [0.5, 0.5, 0.5], [1, 0.5, 0], [0.75, 0.75, 0]])
    own = potential_frequencies(potential, model, q)
    start_error = np.abs(result.start_model.frequencies(q) - truth.frequencies(q)).max()
    assert np.abs(own - truth.frequencies(q)).max() < 0.05 * start_error
    assert result.reach["refined"]["largest_THz"] < TOLERANCE_THZ


@pytest.mark.filterwarnings("ignore:χ²_red")  # the anchored fit misses the data on purpose (docstring)
def test_anchor_keeps_reference_energies(setting, loose):
    """A tight energy anchor (σ_E = 0.1 meV/atom) keeps the energies far closer to the pretrained ones than a
    negligible one (`loose`), the drift it reports obeys the bound its σ_E sets, and the data still pull.

    No fixed bound such as "< 1 meV/atom": the anchor is a penalty weighed against χ², not a constraint. These data
    (counts 1e5, χ² ≈ 1e6 at the start) ask for a stiffer crystal, and no Morse potential is stiffer with the same
    energies; run to convergence, L-BFGS settles at ≈ 11 meV/atom rms, where Σ_c (ΔE_c/σ_E)² ≈ 7e4 balances the χ²
    it saves. What σ_E does bound: the start has no penalty and the refinement keeps its lowest loss, so
    Σ_c (ΔE_c/(n_c·σ_E))² ≤ χ²_start − χ²_refined (ΔE_c/n_c the reported drift per atom of configuration c)."""
    _, _, _, data = setting
    tight, _ = refine(MorsePotential(), nickel(), data, shells=2, method="one-phonon", energy_sigma=1e-4,
                      force_sigma=0, max_iter=30, progress=False)
    drift = tight.anchor_drift
    assert drift["energy_rms_meV_per_atom"] < 0.05 * loose[1].anchor_drift["energy_rms_meV_per_atom"]
    per_atom = np.array(drift["energy_strained_meV_per_atom"] + drift["energy_snapshots_meV_per_atom"]) * 1e-3  # eV
    assert np.sum((per_atom / tight.settings["energy_sigma"]) ** 2) <= tight.chi2_start - tight.fit.chi2
    assert tight.fit.chi2 < 0.1 * tight.chi2_start


def test_lattice_term_holds_the_lattice_constant(setting, loose):
    """With energies and forces free, the data drag the Morse potential's lattice constant (`loose`: 0.5 %: its three
    weights tie a₀ to the stiffness); the lattice term alone, tight (σ_a = 0.01 %), keeps the parabola vertex it holds
    within 5σ_a and the equation of state's a₀ (ASE's Birch–Murnaghan over ±3 %, an independent route) within a tenth
    of the loose move, while the data still pull χ² down by more than 10³."""
    _, _, _, data = setting

    def moved(result):
        eos = result.equation_of_state
        return eos["refined"]["lattice_scale"] / eos["start"]["lattice_scale"] - 1

    held, _ = refine(MorsePotential(), nickel(), data, shells=2, method="one-phonon", energy_sigma=1e3,
                     force_sigma=0, lattice_sigma=1e-4, max_iter=40, progress=False)
    assert abs(moved(held)) < 0.1 * abs(moved(loose[1]))
    assert abs(held.anchor_drift["lattice_vertex_moved_percent"]) < 5 * 1e-4 * 100
    assert held.fit.chi2 < 1e-3 * held.chi2_start


def test_saved_potential_reloads_and_folder_is_complete(setting, loose, tmp_path):
    _, _, _, data = setting
    potential, result, model = loose
    saved = result.save(tmp_path / "out", potential, model, data)
    calc = potential.calculator(saved)
    atoms = nickel().repeat(2)
    atoms.rattle(0.05, seed=1)
    atoms.calc = calc
    assert atoms.get_potential_energy() == pytest.approx(float(potential.energy_forces([atoms])[0][0]), rel=1e-12)
    record = json.loads((tmp_path / "out" / "fit.json").read_text())
    assert set(record["refine"]["phonons_THz"]) >= {"X", "L", "W", "K"}
    assert all(p["sigma"] > 0 for p in record["parameters"])
    for name in ("phonopy_params.yaml", "FORCE_CONSTANTS", "dispersion.png", "tds_fit.png", "data.h5"):
        assert (tmp_path / "out" / name).is_file()
    from ase_tds.properties import read_fit_folder

    folder = read_fit_folder(tmp_path / "out")  # a fit folder: its phonopy files and fit.json are one fit's
    assert np.allclose(folder.model.theta.detach().numpy(), model.theta.detach().numpy(), rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_refinement_on_cuda_equals_cpu(setting):
    _, _, _, data = setting
    options = dict(shells=2, method="one-phonon", energy_sigma=1e3, force_sigma=0, max_iter=3, progress=False)
    cpu, _ = refine(MorsePotential(), nickel(), data, **options)
    cuda, model = refine(MorsePotential(), nickel(), data, device="cuda", **options)
    assert np.allclose(cuda.fit.theta, cpu.fit.theta, rtol=1e-8, atol=0)
    assert model.theta.device.type == "cpu"


def test_protocol_refuses_what_it_cannot_refine():
    with pytest.raises(ValueError, match="layers are"):
        TorchModulePotential(MorsePotential()).parameters(["readout"])
    every = dict(MorsePotential().named_parameters())
    for select in ("all", ["all"]):  # as the API and `--layers all` give it
        assert TorchModulePotential(MorsePotential()).parameters(select).keys() == every.keys()
    with pytest.raises(ValueError, match="cannot import"):
        load_potential("no_such_module:Potential")
    check_potential(load_potential(MorsePotential()), nickel())


def test_refine_command(setting, tmp_path, capsys):
    from ase_tds.cli import main

    _, _, _, data = setting
    data.write(tmp_path / "data.h5")
    nickel().write(tmp_path / "Ni.cif")
    args = ["refine", str(tmp_path / "Ni.cif"), str(tmp_path / "data.h5"), "--potential",
            "toy_torch_potential:MorsePotential", "--shells", "2", "--model", "one-phonon", "--max-iter", "2"]
    assert main(args + ["--device", "nonsense", "--out", str(tmp_path / "refused")]) == 2
    assert "--device nonsense: not a torch device" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    # two iterations from a start far from the data: written, but exit 4 (the model misses the data), never 0
    assert main(args + ["--device", "cpu", "--out", str(tmp_path / "out")]) == 4
    assert "NOT TRUSTED: the refined potential does not describe the data" in capsys.readouterr().out
    assert (tmp_path / "out" / "refined_potential.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["chgnet", "sevenn"])
def test_mlip_adapters_give_differentiable_forces_and_reload(name, tmp_path):
    pytest.importorskip(name)
    potential = load_potential(name)
    atoms = nickel()
    atoms.positions[0, 0] += 0.02
    check_potential(potential, atoms)
    assert sum(p.numel() for p in potential.parameters().values()) < 0.1 * sum(
        p.numel() for p in potential.module.parameters())
    potential.save(tmp_path / "saved")
    atoms.calc = potential.calculator(tmp_path / "saved")
    assert np.allclose(atoms.get_forces(), potential.energy_forces([atoms])[1][0].numpy(), atol=1e-5)


def test_a_stalled_round_ends_the_refinement():
    """L-BFGS over weights whose loss is far above what its iterations still gain (per point) stops once three
    iterations gain less than STALL_ATOL of the loss per point, instead of running to the iteration limit: here a
    Rosenbrock valley (≈ 35 iterations to its floor) on top of a loss of 10⁶ over 1000 points."""
    from scipy.optimize import rosen, rosen_der

    from ase_tds.fitting.optimizers.lbfgs import STALL_ITERATIONS
    from ase_tds.refine.refine import _minimise

    class Loss:
        objective = type("Objective", (), {"n_total": 1000})()
        best, best_x, last = np.inf, None, np.inf

        def __call__(self, x):
            self.last = 1e6 + rosen(x)
            if self.last < self.best:
                self.best, self.best_x = self.last, x.copy()
            return self.last, rosen_der(x)

    loss, history = Loss(), []
    status = _minimise(loss, np.array([-1.2, 1.0]), 200, history, lambda x: history.append(loss.last))
    assert status["converged"] and len(history) <= 2 * (STALL_ITERATIONS + 1)
    assert rosen(loss.best_x) < rosen(np.array([-1.2, 1.0]))
