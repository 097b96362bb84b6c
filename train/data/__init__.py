"""Cached images to batches on the device: the loader (resident or streaming), its row plans and host staging,
and the cross-validation folds over a cache's rows. Imports pipeline/ and torch, no other train/ room."""
