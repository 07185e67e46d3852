"""`python -m ase_tds ...` is the `ase-tds` command (so that launchers such as torchrun can start it)."""

import sys

from .cli import main

sys.exit(main())
