"""The `traces` stage: the subject model's chains of thought, split into labelled steps.

Modules: `config` (TracesConfig), `stage` (`run_stage`; public loader `load_traces`).
"""
