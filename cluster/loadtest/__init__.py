"""Load against a running server: the load generator and the serving benchmark."""
