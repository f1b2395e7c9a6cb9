"""Analyses: metrics (pure functions), feature-quantile probes, Grad-CAM, confusion and galleries."""
