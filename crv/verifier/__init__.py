"""Step verification: graph features, baselines, the xgboost verifier, metrics and plots."""
