"""The HTTP service (`vlp serve`): `create_app(models, settings)` gives a FastAPI app that tests and users
can mount or run under any ASGI server."""

from vlp.serve.app import create_app
from vlp.serve.batching import BatchSettings
from vlp.serve.images import ImageLimits
from vlp.serve.service import ServeSettings

__all__ = ["BatchSettings", "ImageLimits", "ServeSettings", "create_app"]
