import os
import tempfile
from pathlib import Path

# One preset cache for the whole test session (servers started by tests inherit it), outside the
# user's own cache so tests never depend on what a developer created by hand.
os.environ.setdefault("PAGEDBENCH_CACHE", str(Path(tempfile.gettempdir()) / "pagedbench-test-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
