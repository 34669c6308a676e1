"""The collective transport: tensors over a torch.distributed pair per expert actor (channel.py), the actor's
end (server.py) and the coordinator's (transport.py)."""
