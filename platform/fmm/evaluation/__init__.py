"""Scoring: the evaluation protocol shared by `fmm evaluate`, studies and periodic evaluation (pure: no
MLflow), figures, FID and the classifier-feature distance."""
