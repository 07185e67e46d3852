"""Fitting force constants θ to measured TDS: `fit` and its pieces.

- `fit.py` — the driver `fit(model, data, ...)`;
- `objective.py` — the profiled loss of θ and its gradient (weights built once; `set_theta`, the one writer of θ);
- `optimizers/` — the optimisers' table `OPTIMIZERS`, their settings `Optimizer`, typed states (also the checkpoint's
  content) and the one runner `minimise`; `checkpoint.py` — the checkpoint file;
- `starts.py` — the table of named starts `STARTS` (`fit(..., start="springs")`, `ase-tds fit --start`);
- `first_fit.py` — the first fit on a subset of large data; `model_error.py` — the forward model's own error;
- `covariance.py` — the covariance of θ (sandwich, Birge scaling) and the final result; `diagnosis.py` — unstable
  starts, misfit, what the data do not determine; `result.py` — `FitResult` and its files;
- `range.py` — the range the data choose (`fit_range`, `--cutoff auto`); `missing.py` — what a misfit lacks;
  `lean.py` — the lean fits (the loss alone) both compare models with;
- `series.py` — a temperature series, several files fitted jointly (`fit_series`); `series_result.py` —
  `SeriesResult` and its files.
"""

from .fit import fit
from .optimizers import OPTIMIZERS, Optimizer
from .result import FitResult
from .series import fit_series
from .series_result import SeriesResult
from .starts import DEBYE_CANDIDATES, STARTS, StartContext, debye_temperature_from_data, set_start

__all__ = ["DEBYE_CANDIDATES", "OPTIMIZERS", "STARTS", "FitResult", "Optimizer", "SeriesResult", "StartContext",
           "debye_temperature_from_data", "fit", "fit_series", "set_start"]
