"""The `baselines` stage: black-box and gray-box error scores of every step.

Modules: `config` (BaselinesConfig), `stage` (`run_stage`; public loader
`load_baseline_table`).
"""
