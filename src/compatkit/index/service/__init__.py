"""The HTTP service (``compatkit serve``): ``create_app(store, settings)`` and its settings.

Needs the ``service`` extra (fastapi, uvicorn).
"""

from compatkit.index.service.api import create_app
from compatkit.index.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
