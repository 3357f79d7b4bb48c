"""The one entry point: `python server.py [serve|create-user|audit verify|trim] [options]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "site"))

from sessionaudit.cli import main

if __name__ == "__main__":
    sys.exit(main())
