from __future__ import annotations

import pytest
from dlkit import LoopbackImages


@pytest.fixture
def image_server():
    server = LoopbackImages()
    yield server
    server.close()
