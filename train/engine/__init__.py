"""Training: the run's config and options, the trainer (stages, schedule, checkpoints, resume), the per-epoch loop,
optimizer and schedule, EMA, timing, devices and DDP. Imports data/ and augment/, never evaluation/ or a command."""
