"""Many captures at once: `iotscan analyze --jobs N` (a local Dask cluster) or `--scheduler ADDRESS` (an existing one).

Each capture is analysed whole by one worker process exactly as `analyze` analyses it (worker.py: the same
Analysis.run_item, the same stages, models verified there); its records come back to the client as the worker
finishes it, and the client (client.py) writes them, merges the stages' per-capture results in input order (the
device tables, as the serial run merges them) and writes the device records and the summary at the end.
connect.py starts or joins the cluster.

It may import ``iotscan.pipeline``, ``iotscan.capture``, ``iotscan.output``, ``iotscan.stage`` and
``iotscan.errors``; the stages are built from a factory the CLI gives (never imported here).
"""
