"""Speculative decoding: proposers (n-gram, MTP, synthetic), rejection sampling, multi-token verify."""
