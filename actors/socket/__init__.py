"""The socket transport: the expert actor's listener (server.py) and the coordinator's connections (transport.py)."""
