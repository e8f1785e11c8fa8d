"""Serving an engine: the OpenAI-compatible HTTP server and the loop that owns the engine."""
