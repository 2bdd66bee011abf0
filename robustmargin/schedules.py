"""Learning-rate schedules: each one takes the SGD steps of a pass and decides whether a pass that
raised the full training loss is rolled back. All work on the batch loss relative to the frame
F = L̄ (the mean training loss after the last accepted epoch, see losses.relative_loss), so no loss is
ever held in linear space.

- constant:    θ ← θ − η F ∇R, plain SGD with learning rate η on the true loss; never rolls back.
- loss-based:  the paper's rule (Appendix L.1): θ ← θ − α ∇R, i.e. η_t = α_t / L̄_{t−1}; an accepted
               pass multiplies α by r_up, a rejected one is rolled back and divides α by r_down.
- normalized:  ours. Each step is normalized by its own batch loss, θ ← θ − α ∇ log L_b (η = α / L_b),
               with α adapted per pass by the loss-based rule. Under the frame F = L̄ a batch that
               holds a point whose margin was just hurt gets a step L_b / L̄ times larger, which can
               be 1e6 times; that cascade is what forces α down in loss-based. Normalizing by L_b
               bounds every step by α times the largest margin gradient, so α can stay far larger.
"""
from __future__ import annotations

import math

import torch

from robustmargin import distributed
from robustmargin.config import TrainConfig



class Constant:
    rejects = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.alpha = cfg.lr

    def step_size(self, log_frame: float) -> float:
        return self.alpha * math.exp(log_frame)

    def lr_log10(self, log_frame: float) -> float:
        return math.log10(self.alpha)

    def objective(self, log_batch: torch.Tensor, log_frame: float) -> torch.Tensor:
        """What a step descends: R = L_b / F, whose gradient is the true one divided by F."""
        return torch.exp(log_batch - log_frame)

    def step(self, log_batch: torch.Tensor, params, log_frame: float, ok: torch.Tensor) -> torch.Tensor:
        """One SGD step on a batch whose log mean loss is `log_batch`, while `ok`; returns `ok` and-ed with
        this batch's ceiling test.

        The test stays on the device (nothing is read back to the host): once a batch loss passes the
        ceiling, or is nan, this step and every later step of the pass leave the parameters as they are.
        Under data parallelism each rank's gradient is its share, and the shares are summed over ranks.
        """
        ok = ok & (log_batch.detach() - log_frame <= math.log(self.cfg.batch_loss_ceiling))
        grads = torch.autograd.grad(self.objective(log_batch, log_frame), params)
        grads = distributed.all_reduce_sum_(list(grads))
        with torch.no_grad():
            grads = [torch.where(ok, g, 0.0) for g in grads]  # where, not a product: 0 · nan is nan
            torch._foreach_add_(params, grads, alpha=-self.step_size(log_frame))
        return ok

    def begin_pass(self) -> None:
        pass

    def update(self, accepted: bool) -> None:
        pass

    def exhausted(self) -> bool:
        return self.alpha < self.cfg.lr_floor

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])


class LossBased(Constant):
    rejects = True

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.alpha = cfg.alpha0

    def step_size(self, log_frame: float) -> float:
        return self.alpha

    def lr_log10(self, log_frame: float) -> float:
        return math.log10(self.alpha) - log_frame / math.log(10)

    def update(self, accepted: bool) -> None:
        self.alpha = self.alpha * self.cfg.r_up if accepted else self.alpha / self.cfg.r_down


class Normalized(LossBased):
    """Per-step normalized steps θ ← θ − α ∇ log L_b (η = α / L_b), α adapted per pass as in loss-based."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.log_batches: list[torch.Tensor] = []   # log L_b of each step of the current pass
        self.pass_alpha = self.alpha                 # the α those steps used (update() changes α after)

    def begin_pass(self) -> None:
        self.log_batches, self.pass_alpha = [], self.alpha

    def objective(self, log_batch: torch.Tensor, log_frame: float) -> torch.Tensor:
        self.log_batches.append(log_batch.detach())
        return log_batch

    def lr_log10(self, log_frame: float) -> float:
        """log10 of the mean learning rate α / L_b over the steps of the last pass (with the α it used);
        before any pass, the rate of a batch at the mean loss, α / L̄."""
        if not self.log_batches:
            return super().lr_log10(log_frame)
        neg = -torch.stack(self.log_batches).double()
        log_mean_inverse = float(torch.logsumexp(neg, 0)) - math.log(len(self.log_batches))
        return math.log10(self.pass_alpha) + log_mean_inverse / math.log(10)


def make_schedule(cfg: TrainConfig):
    return {"constant": Constant, "loss-based": LossBased, "normalized": Normalized}[cfg.schedule](cfg)
