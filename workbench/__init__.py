"""The workbench: CLI, load generator, benchmarks, tuning and the performance gate."""
