"""Where text lies in token sequences: the token that holds a given character.

A step is a character span of a completion; attribution and baselines need the token
positions that hold it in the exact sequence the model saw. These two helpers map one to
the other for any tokenizer (traces, crv-verify, interventions' regenerations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_char_ends(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """For each token of `ids` (which decode to `text`), the offset just past its last character.

    Decoding token by token is exact for tokenizers whose pieces concatenate (crv-tiny, most
    BPE vocabularies on ASCII); when pieces do not add up to `text`, fall back to decoding
    growing prefixes, which is slower but always consistent with `text`.
    """
    pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
    if "".join(pieces) == text:
        ends, total = [], 0
        for piece in pieces:
            total += len(piece)
            ends.append(total)
        return ends
    return [
        len(tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True)) for i in range(len(ids))
    ]


def last_token_index(char_ends: Sequence[int], end_char: int, offset: int) -> int:
    """Index (into prompt+completion ids) of the token holding character `end_char - 1`."""
    for i, end in enumerate(char_ends):
        if end >= end_char:
            return offset + i
    return offset + len(char_ends) - 1


def step_token_spans(
    tokenizer: Any, ids: Sequence[int], text: str, spans: Sequence[tuple[int, int]], offset: int
) -> tuple[list[int], list[int]]:
    """First and last token index (into prompt+completion ids, the completion's `ids`
    starting at `offset`) of each character span `(start, end)` of `text`."""
    ends = token_char_ends(tokenizer, ids, text)
    first = [last_token_index(ends, start + 1, offset) for start, _ in spans]
    last = [last_token_index(ends, end, offset) for _, end in spans]
    return first, last
