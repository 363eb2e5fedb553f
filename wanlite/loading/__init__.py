"""Checkpoint discovery and streamed loading for every layout users have on disk."""
