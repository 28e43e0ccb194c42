"""`vlp serve`: the app under uvicorn. SIGTERM (or Ctrl-C) stops new requests (503) and lets the ones in
flight finish before the process ends."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from vlp.errors import ConfigError
from vlp.serve.app import create_app
from vlp.serve.batching import BatchSettings
from vlp.serve.command import ServeCommand, models_of
from vlp.serve.images import ImageLimits
from vlp.serve.service import ServeSettings


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: Any) -> None:
        self.config.app.state.service.draining = True
        super().handle_exit(sig, frame)


def serve(command: ServeCommand) -> None:
    settings = ServeSettings(
        batch=BatchSettings(command.max_batch_size, command.max_wait_ms, command.max_queue),
        images=ImageLimits(command.max_image_bytes, command.max_image_pixels),
        max_body_bytes=command.max_body_bytes, timeout_s=command.timeout, device=command.device,
        precision=command.precision,
    )
    if not command.checkpoint and not command.index:
        raise ConfigError("vlp serve needs a model (--checkpoint NAME=DIR) or an index (--index NAME=DIR)")
    app = create_app(models_of(command.checkpoint), settings, indices=models_of(command.index, "--index"))
    logging.getLogger("vlp.serve.access").setLevel(logging.INFO)
    server = DrainingServer(uvicorn.Config(app, host=command.host, port=command.port, log_level="info",
                                           access_log=False, timeout_graceful_shutdown=command.timeout))
    server.run()
