"""`python -m engine.server.api_server MODEL [flags]`: vLLM's module path, the same server."""
import sys

from engine.server.__main__ import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m engine.server.api_server"))
