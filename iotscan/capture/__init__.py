"""Capture: what the user pointed at (files, directories, pipes, interfaces), NFStream's meter over it (and the
snapshots of its busiest active flows a live view asks for), the BPF-filtered side passes that read payloads,
and helpers that parse packets.

It imports nothing of iotscan but ``iotscan.errors``: every other stage builds on it.
"""
