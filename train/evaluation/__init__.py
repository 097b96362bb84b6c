"""What a trained run is worth and what it says about new images: the evaluator, the predictor, metrics and
per-patient tables, reports and figures, test-time augmentation, comparison of runs. Imports engine/, data/,
augment/; never experiment/ or a command."""
