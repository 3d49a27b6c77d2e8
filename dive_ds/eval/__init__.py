"""Held-out perplexity, oracle routing, parameter counts and reports."""
