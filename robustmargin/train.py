"""The training loop: SGD passes in log space, rollback, one metrics row per accepted epoch,
checkpoints at loss thresholds, and exact resume from the last accepted epoch."""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from robustmargin import distributed, losses, margins
from robustmargin.config import Config, TrainConfig, config_from_dict, load_config
from robustmargin.data import SHAPES, load_data
from robustmargin.device import configure as configure_device
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write, atomic_write_text
from robustmargin.kkt import gradient_alignment
from robustmargin.models import ModelSpec, build_model, parameter_norms
from robustmargin.rundir import read_index, record_checkpoint, write_index
from robustmargin.schedules import make_schedule

SUPPORT_DECADES = 7
BETA_POINTS = 256      # β uses the highest-loss points: exact once fewer lie within e^40 of the max loss
BETA_LOG_WINDOW = 40.0
COMPILE_OPTIONS = {"mode": "reduce-overhead", "dynamic": False}
COMPILE_DEVICES = ("cuda",)   # where train.compile = "auto" compiles


def model_spec(cfg: Config) -> ModelSpec:
    channels, size, classes = SHAPES[cfg.data.name]
    m = cfg.model
    return ModelSpec(name=m.name, bias=m.bias, width=m.width, activation=m.activation, hidden=tuple(m.hidden),
                     in_channels=channels, image_size=size, num_classes=classes)


@dataclass
class Evaluation:
    log_losses: torch.Tensor   # log ℓ_n, float64
    margins: torch.Tensor      # q_n, float64

    @property
    def log_mean(self) -> float:
        return float(losses.log_mean(self.log_losses))

    @property
    def accuracy(self) -> float:
        return float((self.margins > 0).double().mean())


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, batch: int) -> Evaluation:
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return Evaluation(losses.sample_log_losses(logits, y, loss), margins.sample_margins(logits, y))


def highest_loss_points(ev: Evaluation) -> torch.Tensor:
    """Indices of the points that carry ∇S to float64 precision (within e^40 of the largest loss),
    at most BETA_POINTS of them: β from these is exact late in training, when it matters."""
    idx = torch.nonzero(ev.log_losses > ev.log_losses.max() - BETA_LOG_WINDOW).squeeze(1)
    return idx[ev.log_losses[idx].argsort(descending=True)[:BETA_POINTS]]


def step_forward(model: torch.nn.Module, device: torch.device, setting: str):
    """The forward pass the SGD steps use: on CUDA with train.compile = "auto", compiled with CUDA graphs
    (fixed shapes: the last short batch of a pass gets its own graph); elsewhere the model itself.

    Compiled graphs belong to one Trainer, so the compile cache starts empty here. Kept across runs,
    the graphs of earlier models (two per run) would fill torch's per-function recompile limit (8) within
    a few runs of a sweep, after which later runs silently train eagerly; emptying it also frees the
    earlier runs' CUDA-graph memory."""
    if device.type not in COMPILE_DEVICES:
        return model
    torch._dynamo.reset()
    return model if setting == "off" else torch.compile(model, **COMPILE_OPTIONS)


def train_device(t: TrainConfig) -> torch.device:
    """This rank's device for train.device (a one-line UserError when it cannot work), with CUDA's
    arithmetic set per train.tf32 and train.deterministic."""
    device = distributed.rank_device(t.device)
    configure_device(device, deterministic=t.deterministic, tf32=t.tf32)
    return device


def threshold_name(t: float) -> str:
    return f"loss_1e{t:g}"


class Trainer:
    def __init__(self, cfg: Config, out: Path, *, quiet: bool = False,
                 data: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """`data` ({"train": (x, y), "test": (x, y)}) replaces the configured dataset (benchmarks)."""
        t = cfg.train
        self.world = distributed.world()
        self.cfg, self.out, self.quiet = cfg, out, quiet or not self.world.is_main
        self.device = train_device(t)
        data = load_data(cfg.data) if data is None else data
        self.x, self.y = (v.to(self.device) for v in data["train"])
        self.x_test, self.y_test = (v.to(self.device) for v in data["test"])
        if t.batch_size > len(self.y):
            raise UserError(f"train.batch_size {t.batch_size} exceeds the {len(self.y)} training points")
        torch.manual_seed(t.seed)
        self.model = build_model(model_spec(cfg)).to(self.device)
        self.params = [p for g in self.model.layer_groups() for p in g]
        self.forward = step_forward(self.model, self.device, t.compile)
        self.stop_early = self.device.type == "cpu"   # reading the ceiling flag costs nothing there
        self.schedule = make_schedule(t)
        self.batches = torch.Generator().manual_seed(t.seed + 1)
        self.epoch, self.grad_evals, self.train_evals, self.seconds, self.passed = 0, 0, 0, 0.0, set()
        self.rollbacks = 0     # passes rolled back since the last accepted epoch
        self.log_frame = math.nan

    # --- state on disk -------------------------------------------------------------------------
    def state_path(self) -> Path:
        return self.out / "state.pt"

    @distributed.on_main
    def save_state(self) -> None:
        state = {"model": self.model.state_dict(), "epoch": self.epoch, "log_frame": self.log_frame,
                 "grad_evals": self.grad_evals, "train_evals": self.train_evals, "seconds": self.seconds,
                 "passed": sorted(self.passed), "rollbacks": self.rollbacks,
                 "schedule": self.schedule.state_dict(), "batches": self.batches.get_state()}
        atomic_write(self.state_path(), lambda tmp: torch.save(state, tmp))

    def load_state(self) -> None:
        try:
            # loaded onto the CPU: the batch-order generator is a CPU generator and takes only a CPU
            # byte tensor; load_state_dict copies the weights onto the model's own device
            state = torch.load(self.state_path(), map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.batches.set_state(state["batches"].cpu())
            self.epoch, self.log_frame = int(state["epoch"]), float(state["log_frame"])
            self.grad_evals, self.seconds = int(state["grad_evals"]), float(state["seconds"])
            self.train_evals, self.rollbacks = int(state["train_evals"]), int(state.get("rollbacks", 0))
            self.passed = set(state["passed"])
            self.schedule.load_state_dict(state["schedule"])
        except Exception as err:  # any damage to the file means the same: it cannot be resumed from
            raise UserError(f"cannot resume: {self.state_path()} is corrupt ({type(err).__name__})") from None
        self.drop_rows_after_state()

    @distributed.on_main
    def forget_old_records(self) -> None:
        self.metrics_path().unlink(missing_ok=True)
        (self.out / "checkpoints" / "index.csv").unlink(missing_ok=True)

    def metrics_path(self) -> Path:
        return self.out / "metrics.csv"

    @distributed.on_main
    def drop_rows_after_state(self) -> None:
        """Remove the metrics rows and index entries that a kill left after the last saved state."""
        with open(self.metrics_path(), newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if int(r["epoch"]) <= self.epoch]
            columns = reader.fieldnames or []

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
        atomic_write(self.metrics_path(), write)
        index = read_index(self.out, required=False)
        if len(index):
            write_index(self.out, index[index["epoch"] <= self.epoch])

    @distributed.on_main
    def append_metrics(self, row: dict) -> None:
        new = not self.metrics_path().exists()
        with open(self.metrics_path(), "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})

    # --- one epoch -----------------------------------------------------------------------------
    def sgd_pass(self) -> bool:
        """One pass over the training set in random batches; False if a batch passed the loss ceiling.

        Data, permutation and the ceiling flag live on the device, and nothing is read back until the
        pass ends. On the CPU, where a read costs nothing, a failed pass stops at the failing batch; the
        parameters and the step count are the same either way.
        """
        t = self.cfg.train
        order = torch.randperm(len(self.y), generator=self.batches).to(self.device)
        self.schedule.begin_pass()
        ok = torch.ones((), dtype=torch.bool, device=self.device)
        taken = torch.zeros((), dtype=torch.int64, device=self.device)  # steps tried, the failing one included
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            taken += ok
            ok = self.schedule.step(self.batch_log_mean(idx), self.params, self.log_frame, ok)
            if self.stop_early and not ok:
                break
        self.grad_evals += int(taken)
        return bool(ok)

    def batch_log_mean(self, idx: torch.Tensor) -> torch.Tensor:
        """log of the mean loss over the global batch `idx`.

        Data-parallel: each rank takes its slice of the batch. The value returned is the global log mean
        on every rank, combined in log space; its gradient is this rank's share, (∂S_r/∂θ) / S with S_r
        the rank's loss sum and S the batch's, so the gradients summed over ranks are the global one.
        """
        t, w = self.cfg.train, self.world
        if w.size == 1:
            return losses.log_mean(losses.sample_log_losses(self.forward(self.x[idx]), self.y[idx], t.loss))
        mine = idx.tensor_split(w.size)[w.rank]
        log_sum = losses.log_sum(losses.sample_log_losses(self.forward(self.x[mine]), self.y[mine], t.loss))
        total = distributed.all_reduce_log_sum_exp(log_sum.detach())
        share = torch.exp(log_sum - total)
        return total - math.log(len(idx)) + (share - share.detach())

    def evaluate_train(self) -> Evaluation:
        """Per-sample losses and margins of the whole training set (each rank evaluates its shard, and
        every rank gets all of them, so every rank takes the same decisions)."""
        self.train_evals += 1
        t, w = self.cfg.train, self.world
        if w.size == 1:
            return evaluate(self.model, self.x, self.y, t.loss, t.eval_batch_size)
        shards = torch.arange(len(self.y), device=self.device).tensor_split(w.size)
        mine = shards[w.rank]
        ev = evaluate(self.model, self.x[mine], self.y[mine], t.loss, t.eval_batch_size)
        sizes = [len(s) for s in shards]
        return Evaluation(distributed.all_gather_rows(ev.log_losses, sizes),
                          distributed.all_gather_rows(ev.margins, sizes))

    def metrics_row(self, ev: Evaluation, rollbacks: int, full: bool) -> dict:
        """The epoch's row. Quantities that need more than the full-set evaluation (test split, β,
        support counts) only when `full`; otherwise their cells are empty, never a stale value."""
        t, model = self.cfg.train, self.model
        norms = parameter_norms(model)
        rho = math.sqrt(sum(r * r for r in norms))
        scale = rho ** model.order
        q_min = float(ev.margins.min())
        log_sum = float(losses.log_sum(ev.log_losses))
        test = evaluate(model, self.x_test, self.y_test, t.loss, t.eval_batch_size) if full and len(self.y_test) else None
        nan = math.nan if full else None
        row = {
            "epoch": self.epoch, "log10_loss": losses.log10(ev.log_mean), "train_acc": ev.accuracy,
            "test_acc": test.accuracy if test else nan,
            "test_log10_loss": losses.log10(test.log_mean) if test else nan,
            "q_min": q_min, "rho": rho, "norm_product": margins.norm_product(norms, model.orders),
            "normalized_margin": q_min / scale,
            "normalized_margin_layerwise": margins.layerwise_normalized_margin(q_min, norms, model.orders),
            "smoothed_normalized_margin": margins.smoothed_normalized_margin(log_sum, t.loss, scale),
            "alpha": self.schedule.alpha,
            "lr_log10": self.schedule.lr_log10(ev.log_mean),
            "rollbacks": rollbacks, "grad_evals": self.grad_evals,
            "train_evals": self.train_evals, "seconds": round(self.seconds, 3),
            "beta": self.beta(ev) if full else None,
        }
        row.update({f"rho_{i + 1}": r for i, r in enumerate(norms)})
        support = margins.support_counts(ev.margins, SUPPORT_DECADES) if full else [None] * SUPPORT_DECADES
        row.update({f"support_{k + 1}": c for k, c in enumerate(support)})
        return row

    def beta(self, ev: Evaluation) -> float:
        idx = highest_loss_points(ev)
        return gradient_alignment(self.model, self.x[idx], self.y[idx], self.cfg.train.loss, dtype=torch.float32)

    def thresholds_due(self, log10_loss: float) -> list[float]:
        t = self.cfg.train
        due = {x for x in t.thresholds if log10_loss < x}
        if t.checkpoint_every_decades > 0:
            k = t.checkpoint_every_decades
            due |= {-k * j for j in range(1, int(-log10_loss // k) + 1)}
        return sorted(due - self.passed, reverse=True)

    @distributed.on_main
    def checkpoint(self, name: str, log10_loss: float, threshold: float | None) -> None:
        record_checkpoint(self.out, self.model, name=name, epoch=self.epoch, log10_loss=log10_loss,
                          threshold_log10=threshold, meta={"config": self.cfg.to_dict()})

    def accept(self, ev: Evaluation) -> dict:
        t = self.cfg.train
        self.log_frame = ev.log_mean
        log10_loss = losses.log10(ev.log_mean)
        due = self.thresholds_due(log10_loss)
        # every k-th epoch and wherever a threshold checkpoint is saved; never by when the run stops, so
        # a resumed run writes the same rows as an uninterrupted one
        full = self.epoch % t.metrics_every == 0 or bool(due)
        row = self.metrics_row(ev, self.rollbacks, full) if self.world.is_main else {}
        self.rollbacks = 0
        self.append_metrics(row)
        for thr in due:
            self.checkpoint(threshold_name(thr), log10_loss, thr)
        self.passed.update(due)
        self.save_state()
        return row

    # --- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> Path:
        t = self.cfg.train
        start = time.perf_counter()
        if resume and self.state_path().exists():
            self.load_state()
        else:  # a fresh start, or a kill before the first state was saved: begin again
            self.forget_old_records()
            self.accept(self.evaluate_train())
        # a total only when the epoch count is what will stop the run: a loss target or a time or step budget
        # usually ends it long before, and a bar towards `epochs` would promise work that is never done
        bounded = t.stop_log10_loss == -math.inf and t.max_seconds == math.inf and not t.max_steps
        bar = tqdm(total=t.epochs if bounded else None, initial=self.epoch, disable=self.quiet, unit="epoch",
                   dynamic_ncols=True)
        stop = "epochs"
        while self.epoch < t.epochs:
            if losses.log10(self.log_frame) < t.stop_log10_loss:
                stop = "target loss"
                break
            if distributed.agreed_max(self.seconds + time.perf_counter() - start, self.device) >= t.max_seconds:
                stop = "time budget"
                break
            if t.max_steps and self.grad_evals >= t.max_steps:
                stop = "step budget"
                break
            if self.schedule.exhausted():
                stop = "learning-rate floor"
                break
            # every schedule keeps the last accepted state: a rejected or diverged pass returns to it,
            # so `final` and state.pt always hold parameters whose numbers were recorded
            backup = [p.detach().clone() for p in self.params]
            ok = self.sgd_pass()
            new = self.evaluate_train() if ok else None
            decreased = ok and new.log_mean < self.log_frame
            self.schedule.update(decreased)
            if not ok or (self.schedule.rejects and not decreased):
                with torch.no_grad():
                    torch._foreach_copy_(self.params, backup)
            if self.schedule.rejects and not decreased:
                self.rollbacks += 1
                continue
            if not ok:
                stop = "diverged"
                break
            self.epoch += 1
            now = time.perf_counter()
            self.seconds += now - start
            start = now
            row = self.accept(new)
            bar.update(1)
            if not self.quiet:  # quiet on every rank but 0, which alone has the row
                bar.set_postfix_str(f"log10 loss {row['log10_loss']:.1f}  margin {row['normalized_margin']:.3g}"
                                    f"  α {row['alpha']:.2g}  rollbacks {row['rollbacks']}")
        bar.close()
        self.seconds += time.perf_counter() - start
        self.checkpoint("final", losses.log10(self.log_frame), None)
        self.save_state()
        distributed.barrier()  # every rank returns once the run's files are complete
        if not self.quiet:
            print(f"stopped ({stop}) after {self.epoch} epochs, {self.seconds:.1f} s: "
                  f"log10 loss {losses.log10(self.log_frame):.2f}; run in {self.out}")
        return self.out


def _check_out(cfg: Config, out: Path, resume: bool) -> None:
    saved = out / "config.toml"
    if not resume:
        if (out / "metrics.csv").exists():
            raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        return
    if not saved.exists():
        return
    old = load_config(saved).to_dict()
    new = cfg.to_dict()
    # keys that may change when a run is continued: where it runs, where data lies, when it stops
    free = {"train.epochs", "train.device", "train.compile", "train.deterministic", "train.tf32", "train.max_seconds",
            "train.max_steps", "train.stop_log10_loss", "data.root", "data.download"}
    for section in new:
        for key in new[section]:
            if f"{section}.{key}" not in free and old[section][key] != new[section][key]:
                raise UserError(f"{out} belongs to another config ({section}.{key} = {old[section][key]!r} "
                                f"there, {new[section][key]!r} here)")


def train(config: Config | dict, out: str | Path, *, resume: bool = False, quiet: bool = True) -> Path:
    """Train per `config` into run directory `out`; with `resume`, continue a killed run."""
    cfg = config if isinstance(config, Config) else config_from_dict(config)
    # the data root is saved as given: a relative one stays relative (data.data_root resolves it at load)
    out = Path(out)
    distributed.init(cfg.train.device)
    _check_out(cfg, out, resume)
    trainer = Trainer(cfg, out, quiet=quiet)
    distributed.barrier()  # every rank has checked the directory before rank 0 writes into it
    if trainer.world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", cfg.to_toml())
    distributed.barrier()
    return trainer.run(resume)
