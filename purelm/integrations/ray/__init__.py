"""purelm on Ray (pip install 'purelm[ray]'): Ray Serve for online traffic, Ray Data for batch
inference. See docs/ray.md.

- `build_app(config)`: a Serve application of N replicas of purelm's OpenAI server (one model per
  replica, continuous batching inside each), with the `PrefixRouter` in front; `app_builder` is the
  same for `serve run` config files; `RayServeConfig` is the one config (model, server, replicas,
  autoscaling, CPUs/GPUs per replica).
- `Processor`: a callable class for `Dataset.map_batches` (completions, chat replies, embeddings);
  `process(ds, model, ...)` sets up the actor pool."""
from __future__ import annotations

from ...errors import PurelmError


class RayMissingError(PurelmError, ImportError):
    """Ray (or its serve/data parts) is not installed."""


try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as e:
    raise RayMissingError(f"purelm.integrations.ray needs Ray Serve and Ray Data ({e}): "
                          "pip install 'purelm[ray]'") from None

from .config import RayServeConfig  # noqa: E402
from .data import Processor, process  # noqa: E402
from .deployment import PurelmIngress, PurelmServer, app_builder, build_app  # noqa: E402
from .router import PrefixRouter  # noqa: E402

__all__ = ["RayServeConfig", "build_app", "app_builder", "PurelmServer", "PurelmIngress", "PrefixRouter",
           "Processor", "process", "RayMissingError"]
