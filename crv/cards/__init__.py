"""The `cards` stage: a card per transcoder feature (when it fires, what it promotes).

Modules: `config` (CardsConfig), `topk` (the streaming per-feature top-n), `stage`
(`compute_cards`, `run_stage`; public loader `load_feature_cards`).
"""
