"""Measures of generated text that need no model (``degeneracy``: collapse into repetition
or symbols), for the sweep and for evaluations."""
from max_jupyter.evaluation.degeneracy import COLLAPSED, Degeneracy, degeneracy, distinct_n

__all__ = ["COLLAPSED", "Degeneracy", "degeneracy", "distinct_n"]
