"""crv: Circuit-based Reasoning Verification.

Verifies a language model's chain-of-thought step by step from the attribution graphs of a
replacement model built from per-layer TopK transcoders. See `docs/architecture.md`.
"""

__version__ = "0.1.0"
