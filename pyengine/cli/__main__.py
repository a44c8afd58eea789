"""``python -m pyengine.cli``: the same as ``python -m pyengine``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
