"""Helpers every layer may use: atomic writes and provenance, resampling, connected components, plugin folders."""
