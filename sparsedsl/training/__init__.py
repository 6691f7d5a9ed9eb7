"""Training-quality harness: small decoder models, tasks and seeds, to measure how well a pattern trains."""
