"""Proxy-Tuning: subject sets and the DreamBooth-tuned diffusion supervisor (stage 1)."""
