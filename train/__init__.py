"""Loading, device-side augmentation, the training loop, checkpoints and reports."""
