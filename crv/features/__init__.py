"""The `features` stage: one row of graph statistics per reasoning step.

Modules: `config` (FeaturesConfig), `compute` (`graph_features`, the families), `table`
(the feature table; public loader `load_feature_table`), `stage` (`run_stage`).
"""
