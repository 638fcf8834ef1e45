"""`python -m workbench.cli ...`, as the `workbench` script (benchmarks that run a child use it)."""
from workbench.cli import main

main()
