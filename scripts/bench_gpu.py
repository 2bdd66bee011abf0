"""Paper-scale benchmark for one GPU; prints one JSON object. Needs no download: the data are synthetic
tensors of the real shapes, labelled by a fixed random teacher network (so they are separable and train
like real data).

For paper-mnist (the paper's CNN, 60000 × 1 × 28 × 28) and paper-cifar (the VGG variant, 50000 × 3 × 32 × 32),
under the loss-based and normalized schedules, with the fast path on (`train.compile = "auto"`: the SGD
step's forward captured with CUDA graphs) and off:
  - seconds per SGD pass over the training set and per accepted epoch (rolled-back passes and the full-set
    evaluation included), from a short run of `--epochs` epochs;
  - seconds per full-set evaluation, peak memory;
and CW at reference settings (`--cw-steps` × `--cw-binary-steps`) on `--cw-points` points of the trained
network, robustmargin's against foolbox's on the same device: points per second.

    python scripts/bench_gpu.py [--device cuda] [--epochs 5] [--cw-points 1000] [--out runs/bench-gpu]
    python scripts/bench_gpu.py --small     # the same on the CPU at toy sizes, a minute or two
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from robustmargin.attacks.runner import run_attack
from robustmargin.config import load_preset, with_overrides
from robustmargin.data import SHAPES
from robustmargin.train import Trainer

PRESETS = {"paper-mnist": 60000, "paper-cifar": 50000}


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


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # Linux: KiB


def bench_training(preset: str, schedule: str, compile_: str, n: int, epochs: int, width: float,
                   device: torch.device, out: Path) -> tuple[dict, Trainer]:
    cfg = with_overrides(load_preset(preset), {"train.schedule": schedule, "train.compile": compile_,
                                               "train.device": str(device), "train.epochs": epochs,
                                               "model.width": width})
    data = {"train": synthetic(cfg.data.name, n, device), "test": synthetic(cfg.data.name, n // 10, device, 1)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_dir = out / f"{preset}-{schedule}-{compile_}"
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, quiet=True, data=data)
    trainer.log_frame = trainer.evaluate_train().log_mean
    timed(trainer.sgd_pass, device)  # warm-up: compilation and graph capture happen here
    passes = [timed(trainer.sgd_pass, device) for _ in range(3)]
    evaluation = timed(trainer.evaluate_train, device)
    run = timed(lambda: trainer.run(resume=False), device)  # writes metrics and checkpoints under `out`
    return {"seconds_per_pass": min(passes), "seconds_per_accepted_epoch": run / max(trainer.epoch, 1),
            "accepted_epochs": trainer.epoch, "seconds_per_evaluation": evaluation,
            "peak_memory_mib": peak_memory_mib(device)}, trainer


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cw-points", type=int, default=1000)
    parser.add_argument("--cw-steps", type=int, default=10000)
    parser.add_argument("--cw-binary-steps", type=int, default=9)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-gpu"))
    parser.add_argument("--small", action="store_true", help="toy sizes on the CPU: a smoke run")
    parser.add_argument("--points", type=int, help="training points (default: the preset's; --small: 200)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma list of " + ", ".join(PRESETS))
    args = parser.parse_args()
    device = torch.device("cpu" if args.small else args.device)
    if args.small:
        args.epochs, args.cw_points, args.cw_steps, args.cw_binary_steps = 1, 20, 20, 2
    width = 0.25 if args.small else 1.0
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
    for preset in args.presets.split(","):
        if preset not in PRESETS:
            parser.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        n = args.points or (200 if args.small else PRESETS[preset])
        entry: dict = {"points": n}
        trainer = None
        for schedule in ("loss-based", "normalized"):
            for compile_ in ("auto", "off"):
                entry[f"{schedule}/compile={compile_}"], trainer = bench_training(
                    preset, schedule, compile_, n, args.epochs, width, device, args.out)
            on, off = entry[f"{schedule}/compile=auto"], entry[f"{schedule}/compile=off"]
            entry[f"{schedule}/fast_path_speedup"] = off["seconds_per_pass"] / on["seconds_per_pass"]
        # training points: those the trained network classifies correctly are attacked (points/s counts them)
        x, y = trainer.x[:args.cw_points], trainer.y[:args.cw_points]
        entry["cw_reference"] = bench_cw(trainer.model, x, y, args.cw_steps, args.cw_binary_steps,
                                         min(args.cw_points, 1000), device)
        report[preset] = entry
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
