"""`purelm serve MODEL --ray --replicas N`: the Serve application of `build_app` on a Ray cluster, until
Ctrl-C. Joins the cluster at --ray-address (or $RAY_ADDRESS, or one started with `ray start` on this
machine), else starts a local one that ends with the command."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from typing import Any

from ...errors import UsageError
from .config import RayServeConfig


def config_from_args(a: Any, sampling: Any = None, template: tuple[str, str] | None = None) -> RayServeConfig:
    """The RayServeConfig the serve command's flags ask for (checked): `sampling`, the sampling flags'
    SamplingParams (those that differ from the defaults go to the replicas); `template`, the chat
    template flags' ("name", NAME) or ("text", TEXT)."""
    from ...cli import _adapters

    model = a.model
    if model is not None and os.path.exists(model):  # replicas run elsewhere (another cwd, maybe another node)
        model = os.path.abspath(model)
    autoscaling = None
    if a.max_replicas is not None:
        if a.max_replicas < a.replicas:
            raise UsageError(f"--max-replicas ({a.max_replicas}) must be at least --replicas ({a.replicas})")
        autoscaling = {"min_replicas": a.replicas, "max_replicas": a.max_replicas}
    return RayServeConfig.from_dict(dict(
        model=model, n_ctx=a.ctx, backend=a.backend, device=a.device, dtype=a.dtype, threads=a.threads,
        cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
        lora=[[os.path.abspath(p), 0.0 if a.lora_init_without_apply else s] for p, s in _adapters(a)] or None,
        parallel=a.parallel, batch=a.batch, max_queue=a.queue,
        api_key=a.api_key or os.environ.get("PURELM_API_KEY") or None, model_name=a.alias,
        prefix_cache=not a.no_prefix_cache, lookup=a.lookup or 0, replicas=a.replicas, autoscaling=autoscaling,
        num_cpus=a.replica_cpus, num_gpus=a.replica_gpus, prefix_routing=not a.no_prefix_routing,
        sampling=_changed(sampling), n_predict=None if a.n_predict == -1 else a.n_predict,
        chat_template=template[1] if template and template[0] == "name" else None,
        chat_template_text=template[1] if template and template[0] == "text" else None))


def _changed(params: Any) -> dict | None:
    """The fields of SamplingParams `params` that differ from the defaults, as a dict (None: none)."""
    if params is None:
        return None
    default = type(params)()
    d = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
         if getattr(params, f.name) != getattr(default, f.name)}
    return d or None


def serve_on_ray(a: Any, sampling: Any = None, template: tuple[str, str] | None = None) -> int:
    import ray
    from ray import serve

    from .deployment import build_app

    cfg = config_from_args(a, sampling, template)
    ray.init(address=a.ray_address, log_to_driver=not a.quiet)
    joined = _joined_existing()
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop.set()) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
        n = f"{cfg.autoscaling['min_replicas']}-{cfg.autoscaling['max_replicas']}" if cfg.autoscaling \
            else str(cfg.replicas)
        print(f"purelm: serving {cfg.model or 'smollm2'} on Ray ({n} replicas, {cfg.num_cpus:g} CPUs and "
              f"{cfg.num_gpus:g} GPUs each) at http://{a.host}:{a.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        try:
            if joined:  # leave the cluster (and its other applications) running
                serve.delete(cfg.name, _blocking=False)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def _joined_existing() -> bool:
    """Whether this driver joined a cluster it did not start (then only its own application goes at
    the end). ray.init marks the node it starts itself as the head it owns."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)
