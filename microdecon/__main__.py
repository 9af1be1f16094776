"""``python -m microdecon``: the same as the ``microdecon`` command."""

import sys

from .cli import main

sys.exit(main())
