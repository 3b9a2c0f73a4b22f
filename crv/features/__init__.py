"""The `features` stage: one row of graph statistics per reasoning step.

Modules: `config` (FeaturesConfig), `stage` (`graph_features`, `run_stage`; public loader
`load_feature_table`).
"""
