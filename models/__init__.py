"""Bundled pretrained models (installed as the iotscan.models package)."""
