"""The chat client: ``python client.py --user alice`` (interactive on a terminal, batch mode on a pipe).

The code lives in the ``securechat`` package: ``securechat.client`` is the ``ChatClient``
library, ``securechat.ui`` the terminal program (``chat`` once the package is installed).
"""

import sys

from securechat.ui import main

if __name__ == "__main__":
    sys.exit(main())
