"""Plumbing every layer may use, importing nothing of alignkit: atomic files, cache locations,
content fingerprints, process-group helpers, HTTP, and transformers' option names."""
