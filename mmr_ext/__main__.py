"""``python -m mmr_ext train|evaluate ...``: the ``mmr-ext`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
