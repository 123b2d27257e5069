"""``python -m mmprompt`` is the ``mmprompt`` command."""

import sys

from .cli import main

sys.exit(main())
