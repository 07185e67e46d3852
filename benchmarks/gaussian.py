"""All-orders (gaussian) TDS for 10⁵ random Q of EMT nickel: wall time, against ase_tds one-phonon.

tds_model(method="gaussian", statistics="quantum") with its default grid (15³ primitive cells) and dw_mesh (12),
forward only (torch.no_grad), the whole call timed (Debye–Waller mesh and real-space covariance included).
Named peer: ase_tds one-phonon (quantum, same dw_mesh) on the same Q. If results/one_phonon_vs_euphonic.json
exists, also the ratio against euphonic's one-phonon Q/s measured there for Ni.

    python benchmarks/gaussian.py           # 10⁵ Q
    python benchmarks/gaussian.py --quick   # 10⁴ Q
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, T_ROOM, best_of, machine, nickel_model, random_q, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10⁴ Q, one repeat")
    parser.add_argument("--n-q", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.n_q, args.repeat = 10_000, 1
    from ase_tds import tds_model

    print(machine())
    model = nickel_model()
    q = torch.as_tensor(random_q(model, args.n_q))
    out = {"n_q": args.n_q}
    for method in ("gaussian", "one-phonon"):
        tds = tds_model(model, T_ROOM, method=method, statistics="quantum")

        def run():
            with torch.no_grad():
                return tds(q)

        run()  # warm-up
        seconds = best_of(run, args.repeat)
        out[method] = {"seconds": seconds, "q_per_s": args.n_q / seconds, "grid": list(tds.grid),
                       "dw_mesh": tds.dw_mesh}
        print(f"{method:<11} quantum, grid {tds.grid}, dw_mesh {tds.dw_mesh}: {seconds:.2f} s for {args.n_q} Q "
              f"({args.n_q / seconds:.3g} Q/s)")
    out["gaussian_over_one_phonon_time"] = out["gaussian"]["seconds"] / out["one-phonon"]["seconds"]
    print(f"gaussian / one-phonon time: {out['gaussian_over_one_phonon_time']:.2f}×")
    peer = RESULTS / "one_phonon_vs_euphonic.json"
    if peer.exists():
        eu = json.loads(peer.read_text())["rows"][0]["euphonic"]["q_per_s"]
        out["euphonic_one_phonon_q_per_s"] = eu
        out["gaussian_time_over_euphonic_one_phonon_time"] = (args.n_q / out["gaussian"]["q_per_s"]) / (args.n_q / eu)
        print(f"gaussian (all orders) time / euphonic one-phonon time (from {peer.name}, {eu:.3g} Q/s): "
              f"{out['gaussian_time_over_euphonic_one_phonon_time']:.2f}×")
    goal = 10.0 * args.n_q / 100_000
    print(f"goal ≤ 10 s per 10⁵ Q: {'met' if out['gaussian']['seconds'] <= goal else 'MISSED'}")
    write_json("gaussian.json", {"args": vars(args), **out})


if __name__ == "__main__":
    main()
