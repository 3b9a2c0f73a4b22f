"""Splitting a completion into reasoning steps by a configurable regex.

A step is one match of a regex applied with `re.MULTILINE`; its span is a pair of character
offsets into the completion (end exclusive, no trailing newline).

* `CANONICAL_STEP_PATTERN`: every non-empty line except an `Answer:` line. In the canonical
  format those are exactly the `Step k:` lines; a line a model mangles (`Stp 2 ...`) still
  counts as a step, so the checker labels it unparseable instead of silently skipping it.
* `GENERIC_STEP_PATTERN`: every non-empty line, for free-text reasoning such as GSM8K.
"""

from __future__ import annotations

import re

CANONICAL_STEP_PATTERN = r"^(?!Answer:)[^\n]*\S[^\n]*$"
GENERIC_STEP_PATTERN = r"^[^\n]*\S[^\n]*$"


def segment_steps(completion: str, pattern: str = CANONICAL_STEP_PATTERN) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the steps of `completion`, in order."""
    return [match.span() for match in re.finditer(pattern, completion, re.MULTILINE)]
