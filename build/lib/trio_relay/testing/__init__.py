"""Protocol-faithful fake provider servers, used by the tests and by ``trio-relay fake-fmp``."""

from .fake_alpaca import FakeAlpacaServer
from .fake_finnhub import FakeFinnhubServer
from .fake_fmp import FakeFmpServer
from .fake_polygon import FakePolygonServer

__all__ = ["FakeAlpacaServer", "FakeFinnhubServer", "FakeFmpServer", "FakePolygonServer"]
