"""Start-up time of the command line: the median wall time of `robustmargin --help`, `--version` and a bad
flag against a bare `python -c pass`, in the same run and interleaved (so a load change hits all alike).
Each is a fresh interpreter: `python -m robustmargin ...` with this checkout first on the path. Prints one
line per command and the excess over `python -c pass`.

    python scripts/bench_cli.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "robustmargin --help": ["-m", "robustmargin", "--help"],
    "robustmargin --version": ["-m", "robustmargin", "--version"],
    "robustmargin train --help": ["-m", "robustmargin", "train", "--help"],
    "robustmargin attack --no-such-flag": ["-m", "robustmargin", "attack", "--no-such-flag"],
}


def seconds(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (default 7)")
    repeats = parser.parse_args().repeats
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, args in COMMANDS.items():
            times[name].append(seconds(args, env))
    base = statistics.median(times["python -c pass"])
    print(f"median of {repeats} runs, {os.cpu_count()} cores, load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for name, ts in times.items():
        median = statistics.median(ts)
        extra = "" if name == "python -c pass" else f"  (+{median - base:.3f} s)"
        print(f"{name:<36} {median:.3f} s{extra}")


if __name__ == "__main__":
    main()
