"""The `cards` stage: a card per transcoder feature (when it fires, what it promotes).

Modules: `config` (CardsConfig), `topk` (the streaming per-feature top-n), `store`
(`FeatureCards`, public loader `load_feature_cards`), `stage` (`compute_cards`,
`run_stage`).
"""
