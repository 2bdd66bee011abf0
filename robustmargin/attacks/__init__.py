"""Minimal-L2 adversarial attacks with one signature, and the runner that measures them.

Every attack is `attack(model, inputs, labels, *, steps=..., ...) -> adversarial inputs`
(same shape as inputs; the original input where nothing was found). Measuring —
skipping misclassified points, verifying results, distances, cost — is the runner's job.
"""
from robustmargin.attacks.alma import alma
from robustmargin.attacks.apgd import apgd
from robustmargin.attacks.cw import carlini_wagner_l2
from robustmargin.attacks.ddn import ddn
from robustmargin.attacks.fmn import fmn
from robustmargin.attacks.runner import (
    ATTACKS,
    BUDGETS,
    ENSEMBLE,
    ENSEMBLES,
    FAST_SETTINGS,
    AttackResult,
    budget_options,
    get_attack,
    minimal_distances,
    per_sample_minimum,
    run_attack,
)

__all__ = [
    "ATTACKS",
    "BUDGETS",
    "ENSEMBLE",
    "ENSEMBLES",
    "FAST_SETTINGS",
    "AttackResult",
    "alma",
    "apgd",
    "budget_options",
    "carlini_wagner_l2",
    "ddn",
    "fmn",
    "get_attack",
    "minimal_distances",
    "per_sample_minimum",
    "run_attack",
]
