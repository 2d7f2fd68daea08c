"""encode_worker."""
