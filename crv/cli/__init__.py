"""Command-line entry points: `crv` (`main`), `crv-verify` (`verify`)."""
