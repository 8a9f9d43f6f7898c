"""fedpipe: federated learning on Flower with small, sealed model updates."""

from fedpipe.config import ConfigError, RunConfig, load_config

__all__ = ["ConfigError", "RunConfig", "load_config"]
__version__ = "0.1.0"
