"""Synthetic reasoning tasks (arithmetic, Boolean), their canonical chain-of-thought format,
an exact step checker, step segmentation and a GSM8K-format loader.

See `crv.tasks.format` for the text format, `crv.tasks.expr` for the printing convention and
`crv.tasks.checker` for how steps are labelled.
"""

from crv.tasks.checker import CheckedTrace, StepCheck, check_completion
from crv.tasks.format import TASKS, Problem, generate_problems, make_splits
from crv.tasks.gsm8k import load_gsm8k
from crv.tasks.segment import CANONICAL_STEP_PATTERN, GENERIC_STEP_PATTERN, segment_steps

__all__ = [
    "CANONICAL_STEP_PATTERN",
    "GENERIC_STEP_PATTERN",
    "TASKS",
    "CheckedTrace",
    "Problem",
    "StepCheck",
    "check_completion",
    "generate_problems",
    "load_gsm8k",
    "make_splits",
    "segment_steps",
]
