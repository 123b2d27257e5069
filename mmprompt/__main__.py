"""``python -m mmprompt`` is the ``mmprompt`` command."""

import sys

from .commands import main

sys.exit(main())
