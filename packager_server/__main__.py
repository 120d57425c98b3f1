"""``python -m packager_server --model-dir DIR``: see :mod:`packager_server.config`."""

import sys

from packager_server.supervisor import main

sys.exit(main())
