"""``python -m pyengine``: the pyengine command line (see pyengine.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
