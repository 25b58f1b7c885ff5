"""Detect: flow features and the context tracker, the request pass and its signatures, the scoring stage,
the trees the models keep and the model store; the risk catalogue, per-flow risks, device risk posture and
the risk stage.

It may import ``iotscan.capture``, ``iotscan.output.records``, ``iotscan.stage`` and ``iotscan.errors``;
never the devices stage, the pipeline or the CLI.
"""
