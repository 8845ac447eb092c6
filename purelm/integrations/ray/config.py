"""One config for a purelm Ray Serve application: the model, the server inside each replica, and how
Ray places and scales the replicas. It is a plain dict on the wire (the `args` of a `serve run` YAML
file, the CLI's flags, Python), checked here once, field by field, before anything starts."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from ...backends.kv_cache import check_cache_type
from ...errors import UsageError
from ...lora import adapter_list
from ...sampling import SamplingParams, check_int

AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "target_ongoing_requests")


@dataclass
class RayServeConfig:
    # the model, loaded once per replica
    model: str | None = None  # a .gguf path (on every node) or a known name (pulled on each node); None: smollm2
    n_ctx: int | None = None
    backend: str | None = None  # None: numba on CPU replicas, torch on GPU replicas
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None  # CPU threads per replica (default: its num_cpus, at least 1)
    cache_type_k: str = "f32"  # the KV cache's types (purelm serve -ctk / -ctv)
    cache_type_v: str = "f32"
    lora: list | None = None  # LoRA adapters, [path, scale] pairs (paths on every node; purelm serve --lora)
    # purelm's server inside each replica (see purelm.server.ServerConfig)
    parallel: int = 8
    batch: int = 512
    max_queue: int = 64
    api_key: str | None = None
    model_name: str | None = None
    prefix_cache: bool = True
    lookup: int = 0  # prompt-lookup draft tokens per step (speculative decoding; 0: off)
    # the defaults of what a request leaves out (purelm serve's sampling flags, -n, --chat-template(-file))
    sampling: dict | None = None  # SamplingParams fields (logit_bias keys may be strings, as JSON's)
    n_predict: int | None = None  # most tokens of a reply without max_tokens (None: until the context is full)
    chat_template: str | None = None  # a built-in template's name (purelm chat --chat-template)
    chat_template_text: str | None = None  # a Jinja template's text, in place of the file's
    # Ray Serve
    name: str = "purelm"  # the application's name
    route_prefix: str = "/"
    replicas: int = 1  # fixed replica count (ignored when autoscaling is set)
    autoscaling: dict | None = None  # {"min_replicas", "max_replicas", "target_ongoing_requests"}
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; > 0 puts the model on the torch backend's CUDA device
    max_ongoing_requests: int | None = None  # per replica (default: 2 * parallel)
    prefix_routing: bool = True  # route requests sharing a prompt prefix to the replica that cached it
    imbalance: int | None = None  # queue-length gap past which prefix affinity yields (default: parallel)

    @classmethod
    def from_dict(cls, d: dict | None) -> "RayServeConfig":
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise UsageError(f"the Ray Serve config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UsageError(f"unknown Ray Serve config key(s): {', '.join(map(str, unknown))} "
                             f"(known: {', '.join(known)})")
        c = cls(**d)
        c.check()
        return c

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        for name in ("model", "backend", "device", "dtype", "api_key", "model_name", "name", "route_prefix",
                     "chat_template", "chat_template_text"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise UsageError(f"{name} must be a string, got {v!r}")
        if not self.name:
            raise UsageError("name must not be empty")
        if not self.route_prefix.startswith("/"):
            raise UsageError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.backend not in (None, "numba", "numpy", "torch"):
            raise UsageError(f"backend must be numba, numpy, torch or None, got {self.backend!r}")
        for name in ("prefix_cache", "prefix_routing"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, lo in (("parallel", 1), ("batch", 1), ("max_queue", 0), ("replicas", 1), ("lookup", 0)):
            check_int(name, getattr(self, name), lo)
        for name in ("n_ctx", "threads", "max_ongoing_requests", "imbalance", "n_predict"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_cache_type("cache_type_k", self.cache_type_k), check_cache_type("cache_type_v", self.cache_type_v)
        if self.lora is not None:
            self.lora = [list(pair) for pair in adapter_list(self.lora)]
        self.sampling_params()
        self.template_choice()
        self.num_cpus = _number("num_cpus", self.num_cpus, 0)
        self.num_gpus = _number("num_gpus", self.num_gpus, 0)
        if self.num_gpus > 0 and self.backend not in (None, "torch"):
            raise UsageError(f"num_gpus = {self.num_gpus}: GPU replicas run the torch backend, not {self.backend}")
        if self.autoscaling is not None:
            a = self.autoscaling
            if not isinstance(a, dict) or set(a) - set(AUTOSCALING_KEYS):
                raise UsageError(f"autoscaling must be a mapping with keys among {', '.join(AUTOSCALING_KEYS)}, "
                                 f"got {a!r}")
            lo = check_int("autoscaling.min_replicas", a.get("min_replicas", 1), 0)
            hi = check_int("autoscaling.max_replicas", a.get("max_replicas", max(lo, 1)), 1)
            if hi < lo:
                raise UsageError(f"autoscaling.max_replicas ({hi}) is less than min_replicas ({lo})")
            if "target_ongoing_requests" in a:
                _number("autoscaling.target_ongoing_requests", a["target_ongoing_requests"], 0, strict=True)

    def sampling_params(self) -> SamplingParams:
        """The request defaults `sampling` gives, checked (errors name the field as sampling.NAME)."""
        d = self.sampling or {}
        if not isinstance(d, dict):
            raise UsageError(f"sampling must be a mapping of sampling fields, got {d!r:.80}")
        known = [f.name for f in fields(SamplingParams)]
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise UsageError(f"unknown sampling field(s): {', '.join(unknown)} (known: {', '.join(known)})")
        d = dict(d)
        bias = d.get("logit_bias")
        if isinstance(bias, dict):  # JSON and YAML give the token ids as strings
            try:
                d["logit_bias"] = {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v
                                   for k, v in bias.items()}
            except ValueError:
                pass  # (validate names the field)
        if isinstance(d.get("dry_sequence_breakers"), list):
            d["dry_sequence_breakers"] = tuple(d["dry_sequence_breakers"])
        params = SamplingParams(**d)
        params.validate({name: f"sampling.{name}" for name in known})
        return params

    def template_choice(self) -> tuple[str, str] | None:
        """chat_template / chat_template_text as purelm.chat.template_choice checks them."""
        from ...chat import template_choice

        return template_choice(self.chat_template, self.chat_template_text, ("chat_template", "chat_template_text"))

    # -- what the pieces take
    def load_kwargs(self) -> dict[str, Any]:
        """purelm.load's arguments in a replica (or a Ray Data actor)."""
        backend, device = self.backend, self.device
        if self.num_gpus > 0:  # Ray sets CUDA_VISIBLE_DEVICES: "cuda" is this replica's GPU
            backend, device = "torch", device or "cuda"
        threads = self.threads or max(1, math.floor(self.num_cpus))
        return dict(backend=backend, n_ctx=self.n_ctx, threads=threads, device=device, dtype=self.dtype,
                    cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, lora=self.lora or [])

    def server_config(self) -> Any:
        from ...server import ServerConfig

        aliases = (self.model,) if self.model and not self.model.lower().endswith(".gguf") else ()
        return ServerConfig(parallel=self.parallel, batch=self.batch, max_queue=self.max_queue,
                            api_key=self.api_key, model_name=self.model_name, aliases=aliases,
                            prefix_cache=self.prefix_cache, lookup=self.lookup, sampling=self.sampling_params(),
                            n_predict=self.n_predict, replica=True)

    def deployment_options(self) -> dict[str, Any]:
        """The model deployment's Serve options: replicas or autoscaling, resources, queue depth."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests or 2 * self.parallel,
        }
        if self.autoscaling is not None:
            a = dict(self.autoscaling)
            a.setdefault("target_ongoing_requests", self.parallel)  # a replica's slots, kept busy
            opts["autoscaling_config"] = a
        else:
            opts["num_replicas"] = self.replicas
        return opts


def _number(name: str, value: object, lo: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < lo or (strict and value == lo):
        raise UsageError(f"{name} must be a number {'>' if strict else '>='} {lo}, got {value!r}")
    return float(value)
