"""The `mechanisms` stage: which graph features and layers mark incorrect steps.

Modules: `config` (MechanismsConfig), `stats` (Fisher, Mann-Whitney, Benjamini-Hochberg,
effect sizes), `planted` (recovery of planted rules' mechanisms), `stage` (`run_stage`,
loader `load_mechanism_table`), `render` (the report.md section).
"""
