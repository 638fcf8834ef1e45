"""OpenAI-compatible HTTP server over the engine: `python -m engine.server MODEL` or `workbench serve MODEL`."""
