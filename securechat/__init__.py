"""A secure terminal group chat: a threaded TCP server and a command-line client.

The layers, bottom up (imports only point down):

- ``protocol`` (framing, message types), ``crypto_utils`` (keys, sealing): no I/O;
- ``ratelimit`` (token buckets), ``channel`` (one connection's sealing state),
  ``accounts`` (users, passwords, tokens);
- ``history`` (the SQLite store), ``rooms`` (one room's local sessions), ``backend``
  (the room backend interface and its in-process implementation), ``hub`` (the chat's rules);
- the server: ``config``, ``hello_signer``, ``handshake`` (its side, socket-free),
  ``connection`` (one client's reader), ``listener`` (accept loop and lifecycle),
  ``admin`` and ``server_cli`` (command line);
- the client: ``client`` (the ``ChatClient`` library) and ``ui`` (the terminal program).
"""
