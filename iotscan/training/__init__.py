"""Training, evaluation and model cards of the bundled models: the flow classifier (`iotscan model`) and the
device model (`iotscan devices train`, devices.py).

It may import every stage (capture, detect, devices, output), the pipeline and ``iotscan.errors``; not the CLI.
"""
