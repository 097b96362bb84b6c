"""Build once: preprocessing, the on-disk cache format and its reader (no torch here)."""
