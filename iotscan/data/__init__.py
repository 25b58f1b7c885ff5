"""Signature data shipped with iotscan."""
