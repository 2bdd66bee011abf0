"""Checks of the paper's theorems on cases that satisfy their assumptions (`robustmargin theory`)."""
from robustmargin.theory.suite import run_theory

__all__ = ["run_theory"]
