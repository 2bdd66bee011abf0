"""The training loop: SGD passes in log space, rollback, one metrics row per accepted epoch,
checkpoints at loss thresholds, and exact resume from the last accepted epoch."""
from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from robustmargin import losses, margins
from robustmargin.checkpoints import read_index, record_checkpoint, write_index
from robustmargin.config import Config, config_from_dict, load_config
from robustmargin.data import SHAPES, load_data
from robustmargin.errors import UserError
from robustmargin.fileio import atomic_write, atomic_write_text
from robustmargin.kkt import gradient_alignment
from robustmargin.models import ModelSpec, build_model, parameter_norms
from robustmargin.schedules import make_schedule

SUPPORT_DECADES = 7
BETA_POINTS = 256      # β uses the highest-loss points: exact once fewer lie within e^40 of the max loss
BETA_LOG_WINDOW = 40.0


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


def threshold_name(t: float) -> str:
    return f"loss_1e{t:g}"


class Trainer:
    def __init__(self, cfg: Config, out: Path, *, quiet: bool = False):
        self.cfg, self.out, self.quiet = cfg, out, quiet
        t = cfg.train
        if t.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("train.device is cuda but no CUDA device is available; use --device cpu")
        self.device = torch.device(t.device)
        data = load_data(cfg.data)
        self.x, self.y = (v.to(self.device) for v in data["train"])
        self.x_test, self.y_test = (v.to(self.device) for v in data["test"])
        if t.batch_size > len(self.y):
            raise UserError(f"train.batch_size {t.batch_size} exceeds the {len(self.y)} training points")
        torch.manual_seed(t.seed)
        self.model = build_model(model_spec(cfg)).to(self.device)
        self.params = [p for g in self.model.layer_groups() for p in g]
        self.schedule = make_schedule(t)
        self.batches = torch.Generator().manual_seed(t.seed + 1)
        self.epoch, self.grad_evals, self.train_evals, self.seconds, self.passed = 0, 0, 0, 0.0, set()
        self.log_frame = math.nan

    # --- state on disk -------------------------------------------------------------------------
    def state_path(self) -> Path:
        return self.out / "state.pt"

    def save_state(self) -> None:
        state = {"model": self.model.state_dict(), "epoch": self.epoch, "log_frame": self.log_frame,
                 "grad_evals": self.grad_evals, "train_evals": self.train_evals, "seconds": self.seconds,
                 "passed": sorted(self.passed), "schedule": self.schedule.state_dict(),
                 "batches": self.batches.get_state()}
        atomic_write(self.state_path(), lambda tmp: torch.save(state, tmp))

    def load_state(self) -> None:
        try:
            state = torch.load(self.state_path(), map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
        except Exception as err:  # any damage to the file means the same: it cannot be resumed from
            raise UserError(f"cannot resume: {self.state_path()} is corrupt ({type(err).__name__})") from None
        self.epoch, self.log_frame = int(state["epoch"]), float(state["log_frame"])
        self.grad_evals, self.seconds = int(state["grad_evals"]), float(state["seconds"])
        self.train_evals = int(state["train_evals"])
        self.passed = set(state["passed"])
        self.schedule.load_state_dict(state["schedule"])
        self.batches.set_state(state["batches"])
        self.drop_rows_after_state()

    def metrics_path(self) -> Path:
        return self.out / "metrics.csv"

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

    def append_metrics(self, row: dict) -> None:
        new = not self.metrics_path().exists()
        with open(self.metrics_path(), "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})

    # --- one epoch -----------------------------------------------------------------------------
    def sgd_pass(self) -> bool:
        """One pass over the training set in random batches; False if a step failed."""
        t = self.cfg.train
        order = torch.randperm(len(self.y), generator=self.batches).to(self.device)
        for start in range(0, len(order), t.batch_size):
            idx = order[start:start + t.batch_size]
            self.grad_evals += 1
            if not self.schedule.step(self.model, self.params, self.x[idx], self.y[idx], self.log_frame):
                return False
        return True

    def evaluate_train(self) -> Evaluation:
        self.train_evals += 1
        t = self.cfg.train
        return evaluate(self.model, self.x, self.y, t.loss, t.eval_batch_size)

    def metrics_row(self, ev: Evaluation, rollbacks: int) -> dict:
        t, model = self.cfg.train, self.model
        norms = parameter_norms(model)
        rho = math.sqrt(sum(r * r for r in norms))
        scale = rho ** model.order
        q_min = float(ev.margins.min())
        log_sum = float(losses.log_sum(ev.log_losses))
        beta_idx = highest_loss_points(ev)
        test = evaluate(model, self.x_test, self.y_test, t.loss, t.eval_batch_size) if len(self.y_test) else None
        row = {
            "epoch": self.epoch, "log10_loss": losses.log10(ev.log_mean), "train_acc": ev.accuracy,
            "test_acc": test.accuracy if test else math.nan,
            "test_log10_loss": losses.log10(test.log_mean) if test else math.nan,
            "q_min": q_min, "rho": rho, "norm_product": margins.norm_product(norms, model.orders),
            "normalized_margin": q_min / scale,
            "normalized_margin_layerwise": margins.layerwise_normalized_margin(q_min, norms, model.orders),
            "smoothed_normalized_margin": margins.smoothed_normalized_margin(log_sum, t.loss, scale),
            "alpha": self.schedule.alpha,
            "lr_log10": self.schedule.lr_log10(ev.log_mean),
            "rollbacks": rollbacks, "grad_evals": self.grad_evals,
            "train_evals": self.train_evals, "seconds": round(self.seconds, 3),
            "beta": gradient_alignment(model, self.x[beta_idx], self.y[beta_idx], t.loss, dtype=torch.float32),
        }
        row.update({f"rho_{i + 1}": r for i, r in enumerate(norms)})
        row.update({f"support_{k + 1}": c for k, c in enumerate(margins.support_counts(ev.margins, SUPPORT_DECADES))})
        return row

    def thresholds_due(self, log10_loss: float) -> list[float]:
        t = self.cfg.train
        due = {x for x in t.thresholds if log10_loss < x}
        if t.checkpoint_every_decades > 0:
            k = t.checkpoint_every_decades
            due |= {-k * j for j in range(1, int(-log10_loss // k) + 1)}
        return sorted(due - self.passed, reverse=True)

    def checkpoint(self, name: str, log10_loss: float, threshold: float | None) -> None:
        record_checkpoint(self.out, self.model, name=name, epoch=self.epoch, log10_loss=log10_loss,
                          threshold_log10=threshold, meta={"config": self.cfg.to_dict()})

    def accept(self, ev: Evaluation, rollbacks: int) -> dict:
        self.log_frame = ev.log_mean
        row = self.metrics_row(ev, rollbacks)
        self.append_metrics(row)
        for thr in self.thresholds_due(row["log10_loss"]):
            self.checkpoint(threshold_name(thr), row["log10_loss"], thr)
            self.passed.add(thr)
        self.save_state()
        return row

    # --- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool) -> Path:
        t = self.cfg.train
        start = time.perf_counter()
        if resume and self.state_path().exists():
            self.load_state()
        else:  # a fresh start, or a kill before the first state was saved: begin again
            self.metrics_path().unlink(missing_ok=True)
            (self.out / "checkpoints" / "index.csv").unlink(missing_ok=True)
            self.accept(self.evaluate_train(), 0)
        bar = tqdm(total=t.epochs, initial=self.epoch, disable=self.quiet, unit="epoch", dynamic_ncols=True)
        stop, rollbacks = "epochs", 0
        while self.epoch < t.epochs:
            if losses.log10(self.log_frame) < t.stop_log10_loss:
                stop = "target loss"
                break
            if self.seconds + time.perf_counter() - start >= t.max_seconds:
                stop = "time budget"
                break
            if t.max_steps and self.grad_evals >= t.max_steps:
                stop = "step budget"
                break
            if self.schedule.exhausted():
                stop = "learning-rate floor"
                break
            backup = [p.detach().clone() for p in self.params] if self.schedule.rejects else None
            ok = self.sgd_pass()
            new = self.evaluate_train() if ok else None
            decreased = ok and new.log_mean < self.log_frame
            self.schedule.update(decreased)
            if not decreased and backup is not None:
                with torch.no_grad():
                    torch._foreach_copy_(self.params, backup)
                rollbacks += 1
                continue
            if not ok:
                stop = "diverged"
                break
            self.epoch += 1
            now = time.perf_counter()
            self.seconds += now - start
            start = now
            row = self.accept(new, rollbacks)
            rollbacks = 0
            bar.update(1)
            bar.set_postfix_str(f"log10 loss {row['log10_loss']:.1f}  margin {row['normalized_margin']:.3g}"
                                f"  α {row['alpha']:.2g}  rollbacks {row['rollbacks']}")
        bar.close()
        self.seconds += time.perf_counter() - start
        self.checkpoint("final", losses.log10(self.log_frame), None)
        self.save_state()
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
    free = {"train.epochs", "train.device", "train.max_seconds", "train.max_steps", "train.stop_log10_loss",
            "data.root", "data.download"}
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
    _check_out(cfg, out, resume)
    trainer = Trainer(cfg, out, quiet=quiet)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.toml", cfg.to_toml())
    return trainer.run(resume)
