"""Redis keys, job queue and per-user latent store."""
