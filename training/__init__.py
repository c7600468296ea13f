"""Mask discovery for IG-Pruning: calibration data, clustering, L0 mask learning, baselines and the igp CLI."""
