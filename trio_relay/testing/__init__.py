"""Protocol-faithful fake provider servers, used by the tests and by ``trio-relay fake-fmp``."""

from .fake_fmp import FakeFmpServer

__all__ = ["FakeFmpServer"]
