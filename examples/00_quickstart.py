"""Quick start: simulate one-phonon TDS of nickel, fit force constants to it, use them in ASE."""
import copy

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from ase_tds import ForceConstantModel, TDSFitted, fit, simulate

atoms = bulk("Ni", "fcc", a=3.52, cubic=True)  # the cell whose r.l.u. index the data
truth = ForceConstantModel(atoms, shells=2).set_from_calculator(EMT(), progress=False)
print(truth, truth.labels, truth.theta.detach().numpy().round(4))  # θ in eV/Å²

hkl = np.random.default_rng(0).uniform(-3.5, 3.5, size=(400, 3))  # (N, 3) r.l.u.
data = simulate(truth, hkl, 300.0, method="one-phonon", counts=1e5, rng=0)  # e.u./atom, Poisson σ
data = data.mask_bragg(0.1, truth.primitive.cell[:])  # drop points near Bragg peaks

model = copy.deepcopy(truth).set_parameters(0.8 * truth.theta.detach().numpy())  # 20 % too soft
result = fit(model, data, method="one-phonon", scale="fixed", progress=False)  # absolute data: scale 1
print(result.table())
print("THz at X:", model.frequencies(model.q_from_hkl([[1, 0, 0]])).round(3))

crystal = atoms.repeat(3)
crystal.calc = TDSFitted(model)  # harmonic ASE calculator from the fitted Φ
crystal.rattle(0.05, seed=1)
print(f"E = {crystal.get_potential_energy():.4f} eV, max |F| = {np.abs(crystal.get_forces()).max():.4f} eV/Å")
