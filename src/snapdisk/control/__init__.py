"""The control socket: a versioned JSON-lines protocol (protocol.py) over STORE/control.sock,
served by a thread of the nbdkit process (server.py), spoken by the CLI and the tests through
client.py; ops.py is the one table of operations, also run without a server by backend.py.
See docs/control.md."""
