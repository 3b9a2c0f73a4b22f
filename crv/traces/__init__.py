"""The `traces` stage: the subject model's chains of thought, split into labelled steps.

Modules: `config` (TracesConfig), `prompts` (plain or chat prompts), `steps` (step keys),
`store` (public loader `load_traces`), `stage` (`run_stage`).
"""
