"""``python -m packager_server --model-dir DIR``: see :mod:`packager_server.config`.

``python -m packager_server predict --input FILE --output FILE`` scores a file instead
(``docker run IMAGE predict …``): see :mod:`packager_server.batch`.
"""

import sys

if sys.argv[1:2] == ["predict"]:
    from packager_server.batch import main as predict

    sys.exit(predict(sys.argv[2:]))

from packager_server.supervisor import main

sys.exit(main())
