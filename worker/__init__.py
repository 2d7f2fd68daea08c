"""Plumbing shared by the worker roles (prefill, decode, encode): configuration, the
engine runtime, status with prefix-cache events, registration and metrics."""
