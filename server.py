"""The chat server: ``python server.py`` serves with defaults; ``python server.py --help`` lists the options.

Account management: ``python server.py adduser NAME`` (also ``deluser``, ``passwd``, ``users``).
The code lives in the ``securechat`` package; this file is the entry point of a checkout
(``chat-server`` is the same program once the package is installed).
"""

import sys

from securechat.server_cli import main

if __name__ == "__main__":
    sys.exit(main())
