#!/usr/bin/env bash
# Run every example in full mode and copy what the pages show (stdout and plots) into docs/outputs/.
# Usage, from anywhere: bash docs/refresh_outputs.sh   (7 min on the shared 2-core machine)
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg
for name in 00_quickstart 01_nickel_benchmark 02_slice 03_using_the_result 04_forward_models 05_any_crystal \
        06_beamline_volume; do
    mkdir -p "docs/outputs/$name"
    echo "running examples/$name.py" >&2
    python "examples/$name.py" > "docs/outputs/$name/stdout.txt"
    if compgen -G "examples_out/$name/*.png" > /dev/null; then
        cp "examples_out/$name/"*.png "docs/outputs/$name/"
    fi
done
