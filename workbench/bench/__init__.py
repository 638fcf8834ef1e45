"""Benchmark logic, below the commands of workbench/cli/: offline throughput, latency and quality
(perplexity) in-process, the served-versus-offline comparison, LoRA load latency, the load
generator's ceiling, the transformers baseline and the roofline floor. Served load itself is
workbench/loadgen/."""
