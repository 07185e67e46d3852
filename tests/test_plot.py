"""ase_tds.plot writes its figures without a display and leaves the user's matplotlib backend as it is."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import cached_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_import_keeps_the_chosen_backend_and_still_writes_png(tmp_path):
    """A backend chosen before the import (here svg, standing in for an interactive one) survives importing and
    using the plot module, which still writes a PNG; no pyplot figure is left open."""
    script = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import numpy as np
        import ase_tds.plot as tds_plot
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        q = np.linspace(1.0, 5.0, 20)
        tds_plot.plot_tds_fit(q, q ** -2, 1.05 * q ** -2, 0.1 * q ** -2, {str(tmp_path / "fit.png")!r})
        assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
        import matplotlib.pyplot as plt
        assert plt.get_fignums() == [], plt.get_fignums()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fit.png").read_bytes().startswith(PNG_MAGIC)


def test_plots_are_written_as_png(tmp_path):
    from ase_tds.plot import dispersion_path, plot_dispersion, plot_identifiability, plot_tds_fit
    from ase_tds.uncertainty import parameter_combinations

    model = cached_model("Ni").set_from_springs(400.0)
    q, x, ticks, labels = dispersion_path(model, npoints=50)
    assert q.shape == (len(x), 3) and len(ticks) == len(labels)
    theta = model.theta.detach().numpy()
    covariance = np.diag((0.05 * np.abs(theta).max()) ** 2 * np.ones(len(theta)))
    plot_dispersion({"springs": model}, tmp_path / "dispersion.png", covariance=covariance)
    combinations = parameter_combinations(model.labels, theta, np.linalg.inv(covariance))
    plot_identifiability(combinations, tmp_path / "identifiability.png")
    q_norm = np.linspace(1.0, 5.0, 30)
    plot_tds_fit(q_norm, q_norm ** -2, 1.1 * q_norm ** -2, 0.1 * q_norm ** -2, tmp_path / "fit.png")
    for name in ("dispersion", "identifiability", "fit"):
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_the_format_follows_the_suffix(tmp_path, suffix, magic):
    from ase_tds.plot import plot_tds_fit

    q_norm = np.linspace(1.0, 5.0, 10)
    plot_tds_fit(q_norm, q_norm ** -2, q_norm ** -2, 0.1 * q_norm ** -2, tmp_path / f"fit{suffix}")
    assert (tmp_path / f"fit{suffix}").read_bytes().startswith(magic)
