"""Tensor and pipeline parallelism: each rank's place in the grid and its process groups (state.py),
the collectives the model uses (collectives.py), the pipeline stage's sends and receives (stage.py)."""
