"""``python -m mmprompt`` is the ``mmprompt`` command."""

import sys

from .run.commands import main

sys.exit(main())
