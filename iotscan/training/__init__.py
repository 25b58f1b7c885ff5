"""Training, evaluation and model cards of the flow classifier (`iotscan model`)."""
