"""Network builders; they know nothing of data."""
