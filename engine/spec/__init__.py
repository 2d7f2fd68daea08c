"""Speculative decoding (issue 17): drafters propose tokens, one target forward over
K+1 positions per request verifies them (engine/spec/verify.py), rejected positions'
KV is rolled back. `Speculation` is what the engine holds."""
