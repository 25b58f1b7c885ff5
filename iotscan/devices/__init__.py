"""Device fingerprinting: every local device's vendor, type and model, with the evidence.

identity.py reads DHCP/mDNS/SSDP payloads in a BPF-filtered second pass; behaviour.py aggregates
a device's flows and computes the model's features; signatures.py loads the signature data file;
fingerprint.py fuses the signals; stage.py is the pipeline stage; train.py trains and evaluates.
"""

from __future__ import annotations

# The device record contract (README, "Devices"): these names are fixed; more fields may follow.
DEVICE_FIELDS: tuple[tuple[str, str], ...] = (
    ("timestamp", "first packet of the device's first flow, ISO 8601 UTC to the millisecond (as flows have it)"),
    ("event_type", "always \"device\""),
    ("mac", "the device's MAC address"),
    ("ips", "local addresses the device sent from, most used first"),
    ("vendor", "vendor, when a signal names one (null otherwise)"),
    ("device_type", "camera, doorbell, smart_plug, light, hub, sensor, alarm, lock, speaker, tv, thermostat, "
                    "health_monitor, appliance, printer, phone, computer, router or unknown"),
    ("model", "product model, null when not known well enough"),
    ("confidence", "0..1, how strongly the signals agree on the type (and model)"),
    ("evidence", "list of {signal, value, points_to}, strongest first"),
    ("first_seen_ms", "first packet of the device's first flow, epoch milliseconds"),
    ("last_seen_ms", "last packet of its last flow"),
    ("flows", "flows in which the device took part"),
    ("bytes", "bytes of those flows, both directions"),
    ("mac_vendor", "organisation of the MAC prefix in the IEEE registry (null if none or randomised)"),
    ("sources", "captures or interfaces the device was seen in"),
)
DEVICE_FIELD_NAMES: tuple[str, ...] = tuple(name for name, _ in DEVICE_FIELDS)
