"""``python -m tnquant``: the command line of :mod:`tnquant.cli`."""

import sys

from tnquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
