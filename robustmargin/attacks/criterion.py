"""What "adversarial" means, defined once for every attack and for the runner's verification.

A point is adversarial when the model's predicted class, `argmax` of the logits with torch's tie rule
(the first maximal index), differs from the label. Attacks use this in their success tests, best-point
bookkeeping and searches, so an attack never discards a point the runner would accept (for example where
all logits tie) nor keeps one it would reject.
"""
from __future__ import annotations

from torch import Tensor


def is_adversarial(logits: Tensor, labels: Tensor) -> Tensor:
    """Boolean (N,): the prediction `logits.argmax(1)` differs from `labels`."""
    return logits.argmax(dim=1) != labels
