"""``python -m pageflip._pager FD``: the postcopy pager process (see migration.pager).

A module of its own, outside ``pageflip.migration``, so that running it does not import
the module it runs twice.
"""

import sys

from .migration.pager import main

sys.exit(main())
