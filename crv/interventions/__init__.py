"""Feature interventions on flagged steps: can the graph that flagged an error also fix it?

Modules: `config` (InterventionsConfig), `propose` (ranked single-feature interventions),
`apply` (regeneration with the edit spliced in), `measure` (rates, controls,
`interventions_markdown`), `stage` (`run_stage`). The method, the controls and the honest
limits of what the stage shows: docs/interventions.md.
"""
