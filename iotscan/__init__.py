"""iotscan: a network-flow inspector for IoT security.

The data flows one way, one package per stage:

    capture/  what the user pointed at, NFStream's meter, the BPF-filtered side passes
    devices/  every local device's vendor, type and model, with the evidence   } stages
    detect/   flow features, signatures, the flow classifier, scoring, risks   } (stage.py)
    output/   the record contract, the sinks (NDJSON, JSON, CSV), the terminal table and live view, the HTML
              report, the console
    inspect/  one flow down to its packets, through tshark

pipeline.py runs capture -> stages -> output over files, live.py over an interface, cluster/ over
many files at once on Dask workers; cli/ wires options to them; training/ and lab/ build the bundled
models and their data. tests/test_layout.py checks which package may import which.
"""

from iotscan import _compat

__version__ = "0.1.0"

_compat.install()
