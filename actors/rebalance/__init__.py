"""Expert load balancing: measuring load (meter), planning a placement (plan), switching to it live (live)."""
