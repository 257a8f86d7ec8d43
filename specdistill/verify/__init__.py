"""The speculative verifier: proposers, chain/tree verification, lossless sampling, metrics."""
