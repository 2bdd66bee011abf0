"""The GPU benchmark, one script of under 10 minutes on one GPU; prints one JSON document. Needs no
download: the data are synthetic tensors of the real shapes, labelled by a fixed random teacher network
(so they are separable and train like real data).

For paper-mnist (the paper's CNN on 60000 × 1 × 28 × 28; `--presets paper-mnist,paper-cifar` adds the VGG
variant on 50000 × 3 × 32 × 32), under the loss-based schedule (`--schedules` for more), three rows:
  - fast path on (`train.compile = "auto"`: the SGD step's forward captured with CUDA graphs) and off,
    both deterministic (the default); and fast path on with `train.deterministic = false`;
  - each row: seconds per SGD pass, per accepted epoch (rolled-back passes and the full-set evaluation
    included, from a short run of `--epochs` epochs) and per full-set evaluation; its own peak memory
    (everything of the previous rows freed first); whether one pass repeated from the same parameters
    and batch order gives the same bits;
  - fast_path_speedup (off / on) and deterministic_cost (deterministic / not, seconds per pass);
  - TF32 against IEEE float32: the margins and loss of the fast-path run's final network, evaluated both ways;
  - CW (`--cw-steps` × `--cw-binary-steps`) on `--cw-points` training points of that network,
    robustmargin's against foolbox's on the same device: points per second;
and, when two GPUs are visible, a two-rank torchrun smoke run of the data-parallel training (nccl).

    python scripts/bench_gpu.py [--device cuda] [--epochs 3] [--cw-points 1000] [--out runs/bench-gpu]
    python scripts/bench_gpu.py --small     # the same on the CPU at toy sizes (the torchrun run with gloo)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from robustmargin import distributed
from robustmargin.attacks.runner import run_attack
from robustmargin.config import load_preset, with_overrides
from robustmargin.data import SHAPES
from robustmargin.device import configure
from robustmargin.models import build_model, parameter_norms
from robustmargin.train import Trainer, evaluate, model_spec

PRESETS = {"paper-mnist": 60000, "paper-cifar": 50000}
ROWS = {  # name: (train.compile, train.deterministic)
    "fast_path=on": ("auto", True),
    "fast_path=off": ("off", True),
    "fast_path=on/deterministic=false": ("auto", False),
}


def synthetic(dataset: str, n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform images labelled by the argmax of a fixed random two-layer teacher."""
    channels, size, classes = SHAPES[dataset]
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * size * size, 256),
                                  torch.nn.ReLU(), torch.nn.Linear(256, classes))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        y = torch.cat([teacher(x[i:i + 4096] - 0.5).argmax(1) for i in range(0, n, 4096)])
    return x.to(device), y.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def release(device: torch.device) -> None:
    """Free what earlier rows left (the caller has dropped its references): their compiled graphs and
    CUDA-graph pools, the cached blocks, and the peak, so that the next row's peak is its own."""
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_mib(device: torch.device, peak: bool) -> float | None:
    """CUDA memory held by tensors (None on the CPU, where the process's peak RSS is not per row)."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2 ** 20


def repeat_is_identical(trainer: Trainer) -> bool:
    """One SGD pass run twice from the same parameters, batch order and schedule state: the same bits?
    (In one process: run to run, cuDNN's timing-based algorithm choice may differ as well.)"""
    start, order, schedule = [p.detach().clone() for p in trainer.params], trainer.batches.get_state(), \
        trainer.schedule.state_dict()
    ends = []
    for _ in range(2):
        with torch.no_grad():
            torch._foreach_copy_(trainer.params, start)
        trainer.batches.set_state(order)
        trainer.schedule.load_state_dict(dict(schedule))
        trainer.sgd_pass()
        ends.append([p.detach().clone() for p in trainer.params])
    return all(torch.equal(a, b) for a, b in zip(*ends))


def bench_row(cfg, data, run_dir: Path, device: torch.device) -> tuple[dict, dict]:
    """One row's figures, and the trained network's state (on the CPU) for the later measurements."""
    release(device)
    at_start = memory_mib(device, peak=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, quiet=True, data=data)
    trainer.log_frame = trainer.evaluate_train().log_mean
    first = timed(trainer.sgd_pass, device)  # compilation and graph capture happen here
    passes = [timed(trainer.sgd_pass, device) for _ in range(3)]
    evaluation = timed(trainer.evaluate_train, device)
    identical = repeat_is_identical(trainer)
    run = timed(lambda: trainer.run(resume=False), device)  # writes metrics and checkpoints under run_dir
    row = {"seconds_per_pass": min(passes), "seconds_first_pass": first,
           "seconds_per_accepted_epoch": run / max(trainer.epoch, 1), "accepted_epochs": trainer.epoch,
           "seconds_per_evaluation": evaluation, "repeated_pass_bit_identical": identical,
           "memory_at_start_mib": at_start, "peak_memory_mib": memory_mib(device, peak=True)}
    return row, {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}


def tf32_against_ieee(cfg, state: dict, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict:
    """The same network evaluated on the training set with IEEE float32 and with TF32 arithmetic."""
    model = build_model(model_spec(cfg)).to(device)
    model.load_state_dict(state)
    scale = math.sqrt(sum(r * r for r in parameter_norms(model))) ** model.order
    ev = {}
    for tf32 in (False, True):
        configure(device, deterministic=cfg.train.deterministic, tf32=tf32)
        ev[tf32] = evaluate(model, x, y, cfg.train.loss, cfg.train.eval_batch_size)
    configure(device, deterministic=cfg.train.deterministic, tf32=False)
    ieee, tf32 = ev[False], ev[True]
    q_ieee, q_tf32 = float(ieee.margins.min()), float(tf32.margins.min())
    return {"applies": device.type == "cuda",
            "normalized_margin_ieee": q_ieee / scale, "normalized_margin_tf32": q_tf32 / scale,
            "q_min_relative_difference": abs(q_tf32 - q_ieee) / abs(q_ieee) if q_ieee else None,
            "margin_max_abs_difference": float((tf32.margins - ieee.margins).abs().max()),
            "margin_sign_changes": int(((tf32.margins > 0) != (ieee.margins > 0)).sum()),
            "log_loss_ieee": ieee.log_mean, "log_loss_tf32": tf32.log_mean}


def bench_cw(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, binary_steps: int,
             batch: int, device: torch.device) -> dict:
    options = {"steps": steps, "binary_search_steps": binary_steps}
    result = {}
    for name in ("cw", "foolbox-cw"):
        r = run_attack(model.eval(), x, y, name, batch_size=batch, device=device, **options)
        result[name] = {"points_per_second": r.attacked / r.seconds if r.attacked else None,
                        "seconds": r.seconds, "attacked": r.attacked,
                        "median_distance": float(r.distances[r.correct].median()) if r.attacked else None}
    ours, theirs = result["cw"]["points_per_second"], result["foolbox-cw"]["points_per_second"]
    result["speedup"] = ours / theirs if ours and theirs else None
    return result


def bench_preset(preset: str, args, device: torch.device) -> dict:
    n = args.points or (200 if args.small else PRESETS[preset])
    entry: dict = {"points": n}
    for schedule in args.schedules.split(","):
        rows, state = {}, None
        for row, (compile_, deterministic) in ROWS.items():
            cfg = config(preset, args, device, schedule=schedule, compile_=compile_, deterministic=deterministic)
            data = {"train": synthetic(cfg.data.name, n, device), "test": synthetic(cfg.data.name, n // 10, device, 1)}
            name = f"{preset}-{schedule}-{row.replace('/', '-').replace('=', '-')}"
            rows[row], trained = bench_row(cfg, data, args.out / name, device)
            state = trained if row == "fast_path=on" else state
            del data
        on, off, fast = rows["fast_path=on"], rows["fast_path=off"], rows["fast_path=on/deterministic=false"]
        entry[schedule] = {**rows, "fast_path_speedup": off["seconds_per_pass"] / on["seconds_per_pass"],
                           "deterministic_cost": on["seconds_per_pass"] / fast["seconds_per_pass"]}
        if schedule == args.schedules.split(",")[0]:
            release(device)
            cfg = config(preset, args, device, schedule=schedule)
            x, y = synthetic(cfg.data.name, n, device)
            entry["tf32_against_ieee"] = tf32_against_ieee(cfg, state, x, y, device)
            model = build_model(model_spec(cfg)).to(device)
            model.load_state_dict(state)
            # training points: those the trained network classifies correctly are attacked (points/s counts them)
            entry["cw"] = bench_cw(model, x[:args.cw_points], y[:args.cw_points], args.cw_steps,
                                   args.cw_binary_steps, min(args.cw_points, 1000), device)
            del model, x, y
    return entry


def config(preset: str, args, device: torch.device, *, schedule: str, compile_: str = "auto",
           deterministic: bool = True):
    return with_overrides(load_preset(preset), {
        "train.schedule": schedule, "train.compile": compile_, "train.deterministic": deterministic,
        "train.device": str(device), "train.epochs": args.epochs, "model.width": 0.25 if args.small else 1.0})


def torchrun_smoke(args, device: torch.device) -> dict:
    """Two ranks of data-parallel training under torchrun (nccl on two GPUs; gloo on the CPU with --small)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} CUDA device visible, 2 needed"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).resolve()), "--torchrun-rank", "--device", str(device), "--out", str(args.out),
               "--epochs", "2", "--points", str(args.points or (200 if args.small else 6000))]
    if args.small:
        command.append("--small")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        return {"returncode": None, "error": "timed out after 240 s"}
    result = {"returncode": proc.returncode, "seconds": time.perf_counter() - start}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
    else:
        result["error"] = proc.stderr[-1500:]
    return result


def torchrun_rank(args) -> None:
    """One rank of the torchrun smoke run: paper-mnist on synthetic data; rank 0 prints one JSON line."""
    device = torch.device(args.device)
    w = distributed.init(str(device))
    cfg = with_overrides(load_preset("paper-mnist"), {"train.device": str(device), "train.epochs": args.epochs,
                                                      "model.width": 0.25 if args.small else 1.0})
    data = {"train": synthetic(cfg.data.name, args.points, device), "test": synthetic(cfg.data.name, 10, device, 1)}
    trainer = Trainer(cfg, args.out / "torchrun", quiet=True, data=data)
    if w.is_main:
        (args.out / "torchrun").mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    trainer.run(resume=False)
    if w.is_main:
        print(json.dumps({"ranks": w.size, "backend": torch.distributed.get_backend(),
                          "rank0_device": str(trainer.device), "epochs": trainer.epoch,
                          "log_loss": trainer.log_frame}))
    torch.distributed.destroy_process_group()


def finite_or_none(value):
    """JSON has no infinities or NaN: those become null."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cw-points", type=int, default=1000)
    parser.add_argument("--cw-steps", type=int, default=1000)
    parser.add_argument("--cw-binary-steps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gpu"))
    parser.add_argument("--small", action="store_true", help="toy sizes on the CPU: a smoke run")
    parser.add_argument("--points", type=int, help="training points (default: the preset's; --small: 200)")
    parser.add_argument("--presets", default="paper-mnist", help="comma list of " + ", ".join(PRESETS))
    parser.add_argument("--schedules", default="loss-based", help="comma list, e.g. loss-based,normalized")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the two-rank torchrun run")
    parser.add_argument("--torchrun-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun_rank:
        return torchrun_rank(args)
    device = torch.device("cpu" if args.small else args.device)
    if args.small:
        args.epochs, args.cw_points, args.cw_steps, args.cw_binary_steps = 1, 20, 20, 2
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    start = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    for preset in args.presets.split(","):
        report[preset] = bench_preset(preset, args, device)
    release(device)
    report["torchrun"] = {"skipped": "--no-torchrun"} if args.no_torchrun else torchrun_smoke(args, device)
    report["seconds"] = time.perf_counter() - start
    print(json.dumps(finite_or_none(report), indent=2))


if __name__ == "__main__":
    main()
