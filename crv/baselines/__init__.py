"""The `baselines` stage: black-box and gray-box error scores and probe inputs of every step.

Modules: `config` (BaselinesConfig), `scores` (per-trace scores, pooled hidden states and
transcoder latents, the artifact's loaders), `stage` (`run_stage`).
"""
