"""The expert pool: starting its actors (expert_pool.py), the shared pool service and its manager (service.py), restarting a dead actor (recovery.py)."""
