"""Engines: where a relay gets its prices from and shares them (``engine.backend``).

``redis`` (:mod:`trio_relay.engine.redis`): a fleet of relays on one Redis, one upstream holder.
"""
