"""Test-only builders: tiny random models and pipelines for tests and the CPU demo."""
