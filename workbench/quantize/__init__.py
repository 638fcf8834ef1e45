"""`workbench models quantize`: AWQ and GPTQ checkpoints written from a dense model directory.
rtn.py (the quantization grid, round to nearest), awq.py (activation-aware scales), gptq.py (Hessian-based
column updates), calibrate.py (layer-by-layer inputs through transformers), writer.py (the files)."""
