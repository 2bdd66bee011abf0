"""Sharded attack evaluation benchmark; prints one JSON object.

The same work — the fast ensemble on the first `--n` test points of two checkpoints of a small CNN, in
batches of `--batch-size` — evaluated by `evaluate_run` under torchrun with 1 rank × 1 thread and with
2 ranks × 1 thread each, on the CPU, alternating `--repeats` times; the fastest of the repeats counts
(the median is reported too). Times are the evaluation's wall time
(the ranks already started and joined: from a barrier before `evaluate_run` to rank 0's merged files),
and the launcher's wall time (interpreter and torch start-up included). With CUDA: attack points per
second on one GPU (1 rank) and the speed-up of 2 ranks sharing that GPU. The machine's load average is
recorded before and after, since other processes on the cores change the result.

    python scripts/bench_distributed.py --out /tmp/bench-distributed [--n 200] [--batch-size 50] [--steps 100]
        [--repeats 3] [--no-cuda]

Everything is written under --out (the run directory and its copies).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robustmargin import distributed  # noqa: E402


def make_run(run: Path, *, n_test: int) -> None:
    """A run directory with two checkpoints (after 2 and 8 epochs) of a small bias-free CNN."""
    import torch.nn.functional as F

    from robustmargin.rundir import record_checkpoint
    from robustmargin.config import config_from_dict
    from robustmargin.rundir import load_split
    from robustmargin.models import ModelSpec, build_model

    cfg = config_from_dict({"data": {"n_train": 1000, "n_test": max(n_test, 100)},
                            "model": {"name": "cnn", "bias": "none", "width": 0.25}})
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.to_toml())
    x, y = load_split(run, "train")
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="cnn", bias="none", width=0.25))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    epoch = 0
    for until in (2, 8):
        for epoch in range(epoch + 1, until + 1):
            for i in range(0, len(x), 50):
                opt.zero_grad()
                F.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
                opt.step()
        record_checkpoint(run, model.eval(), name=f"epoch-{epoch}", epoch=epoch, log10_loss=-float(epoch),
                          threshold_log10=None, meta={})
        model.train()


def worker(args: argparse.Namespace) -> None:
    """One rank: time evaluate_run between barriers; rank 0 writes the seconds to --timing."""
    from robustmargin.robustness import evaluate_run

    with distributed.group(args.device) as w:
        torch.set_num_threads(1)
        distributed.barrier()
        start = time.perf_counter()
        evaluate_run(args.worker, splits=("test",), n=args.n, batch_size=args.batch_size, steps=args.steps,
                     device=args.device, progress=False)
        seconds = time.perf_counter() - start  # evaluate_run ends with a barrier after rank 0's merge
        if w.is_main:
            Path(args.timing).write_text(json.dumps({"seconds": seconds, "ranks": w.size}))


def launch(run: Path, ranks: int, args: argparse.Namespace, device: str) -> dict:
    timing = run.parent / f"{run.name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(Path(__file__).resolve()), "--", "--worker", str(run), "--timing", str(timing), "--device", device,
           "--n", str(args.n), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench_distributed: {ranks} ranks failed:\n{done.stderr[-3000:]}")
    return {"seconds": json.loads(timing.read_text())["seconds"], "launcher_seconds": wall,
            "load_average_1min_before": load}


def compare(template: Path, out: Path, args: argparse.Namespace, device: str) -> dict:
    times: dict[int, list[dict]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for ranks in (1, 2):  # alternated, so that a change of load hits both alike
            run = out / f"{device}-{ranks}rank-{repeat}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(template, run)
            times[ranks].append(launch(run, ranks, args, device))
    # other processes on the cores only ever slow a run down: the fastest of the repeats is the least
    # disturbed measurement, the median says how much disturbance there was
    best = {r: {k: min(t[k] for t in ts) for k in ("seconds", "launcher_seconds")} for r, ts in times.items()}
    med = {r: statistics.median(t["seconds"] for t in ts) for r, ts in times.items()}
    units = 2 * args.n * 2  # checkpoints × points × attacks of the default ensemble
    return {
        "one_rank": best[1], "two_ranks": best[2],
        "speedup": best[1]["seconds"] / best[2]["seconds"],
        "speedup_launcher": best[1]["launcher_seconds"] / best[2]["launcher_seconds"],
        "speedup_of_medians": med[1] / med[2],
        "attack_points_per_second": {"one_rank": units / best[1]["seconds"],
                                     "two_ranks": units / best[2]["seconds"]},
        "all_runs": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-distributed"))
    parser.add_argument("--n", type=int, default=200, help="test points per checkpoint")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100, help="steps of each attack of the fast ensemble")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cuda", action="store_true", help="skip the GPU measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--timing", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    template = args.out / "template"
    shutil.rmtree(template, ignore_errors=True)
    torch.set_num_threads(1)
    make_run(template, n_test=args.n)
    report = {"cores": distributed.cores(), "load_average_before": os.getloadavg(),
              "work": {"checkpoints": 2, "split": "test", "points": args.n, "batch_size": args.batch_size,
                       "attacks": "ddn,fmn", "steps": args.steps},
              "cpu": compare(template, args.out, args, "cpu")}
    if torch.cuda.is_available() and not args.no_cuda:
        report["cuda"] = {"gpu": torch.cuda.get_device_name(0), **compare(template, args.out, args, "cuda")}
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
