"""The performance gate: the comparison against a baseline (compare.py) and against a history of
runs (history.py). The command that runs benchmarks and writes files is workbench/cli/gate.py."""
