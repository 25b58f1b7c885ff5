"""Device fingerprinting: every local device's vendor, type and model, with the evidence.

identity.py reads DHCP/mDNS/SSDP payloads in a BPF-filtered second pass; behaviour.py aggregates
a device's flows and computes the model's features; signatures.py loads the signature data files
(products in iotscan/data/device_signatures.json, generic type evidence in device_types.json);
fingerprint.py fuses the signals; stage.py is the pipeline stage (its model is trained by
iotscan/training/devices.py). The device record's fields are defined with the others, in
iotscan/output/records.py.

It may import ``iotscan.capture``, ``iotscan.output.records``, ``iotscan.stage``, ``iotscan.errors`` and
the model machinery it shares with detect (``iotscan.detect.trees``, ``iotscan.detect.modelstore``);
never the pipeline or the CLI.
"""

from __future__ import annotations

from iotscan.output.records import DEVICE_FIELD_NAMES, DEVICE_FIELDS

__all__ = ["DEVICE_FIELDS", "DEVICE_FIELD_NAMES"]
