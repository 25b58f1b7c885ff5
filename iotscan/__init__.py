"""iotscan: a network-flow inspector for IoT security."""

__version__ = "0.1.0"
