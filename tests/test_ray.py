"""purelm on Ray (purelm.integrations.ray): a local Ray cluster on loopback, two Serve replicas of
SmolLM2 behind the prefix router, driven by the `openai` client and checked against the
single-process server (purelm's app under uvicorn in this process); a replica killed and replaced; a
Ray Data job over 1,000 prompts checked row by row against `llm.generate`.

One module-scoped cluster keeps the whole module near a minute on 2 cores. Skips (with the reason)
when Ray Serve / Ray Data are not installed: pip install 'purelm[ray]'."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'purelm[ray]'")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'purelm[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'purelm[ray]'")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import ray  # noqa: E402
from ray import serve  # noqa: E402

import purelm  # noqa: E402
from purelm.errors import PurelmError, UsageError  # noqa: E402
from purelm.integrations.ray import RayServeConfig, build_app, process  # noqa: E402
from purelm.integrations.ray.router import PrefixTable, block_hashes, prompt_text  # noqa: E402
from purelm.server import ServerConfig, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")  # Ray's own, from its internals

N_CTX = 512
MODEL = "SmolLM2-135M-Instruct.Q4_1"
APP = "purelm-test"
REPLICA_PREFIX = f"SERVE_REPLICA::{APP}#PurelmServer#"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """The single-process reference: purelm's app under uvicorn in a thread."""

    def __init__(self, llm) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(llm, ServerConfig(parallel=8)), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert time.monotonic() - t0 < 30 and self.thread.is_alive(), "the reference server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def cluster(smollm2_path):
    """Ray on loopback with Serve on a free port and the purelm app (2 replicas) deployed."""
    ray.init(num_cpus=6, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = {"model": str(smollm2_path), "n_ctx": N_CTX, "replicas": 2, "num_cpus": 1, "parallel": 8,
               "name": APP, "n_predict": 400, "sampling": {"seed": 1234, "dry_sequence_breakers": ["\n"]}}
        serve.run(build_app(cfg), name=APP, route_prefix="/purelm")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/purelm/v1", api_key="none", max_retries=0,
                               timeout=60)
        client.port = port
        yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(smollm2_path):
    # one thread, as each replica (num_cpus 1): the numba kernels' sums split by thread count, which can
    # flip a near-tie greedy choice a few tokens in
    s = LocalServer(purelm.load(smollm2_path, n_ctx=N_CTX, threads=1))
    yield s
    s.stop()


def replicas() -> dict[str, object]:
    """The live PurelmServer replicas: id -> actor handle."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].startswith(REPLICA_PREFIX):
            out[a["name"][len(REPLICA_PREFIX):]] = ray.get_actor(a["name"], namespace=a["namespace"])
    return out


def replica_stats() -> dict[str, dict]:
    """Each replica's engine counters, through Serve's per-replica stats hook (record_routing_stats)."""
    return {rid: ray.get(h.record_routing_stats.remote(), timeout=30) for rid, h in replicas().items()}


QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
             "Write a haiku about rain.", "How many legs has a spider?", "What is 2 + 2?",
             "Who wrote Hamlet?", "What is water made of?", "Say hello in Spanish.", "Name a planet.",
             "What is the opposite of hot?", "Give me a fruit.", "What do bees make?",
             "What is the largest ocean?", "Count to three.", "What is a triangle?"]
PROMPTS = ["Once upon a time", "The three laws of robotics", "def fibonacci(n):", "In 1492, Columbus",
           "The best way to learn", "Photosynthesis is", "My favourite book", "The quick brown fox",
           "Paris is known for", "A healthy breakfast", "The theory of relativity", "import numpy as np",
           "Dear diary, today", "The recipe calls for", "Mount Everest is", "Machine learning means"]


def _stream_text(raw) -> tuple[str, str]:
    """(text, replica) of a streamed chat or completion reply read through the raw response."""
    replica = raw.headers.get("x-purelm-replica")
    parts = []
    for e in raw.parse():
        if e.choices:
            c = e.choices[0]
            parts.append((c.delta.content or "") if hasattr(c, "delta") else c.text)
    return "".join(parts), replica


def chat(i: int) -> list[dict]:
    """Client i's conversation. Its own short system prompt keeps it from sharing 16 tokens (the
    engine's MIN_PREFIX) with another's: a prompt continued from a cached prefix is evaluated in other
    chunks than a fresh one, which moves its logits by float rounding and can flip a near-tie greedy
    token, so only replies made from the same cache state are comparable token for token."""
    return [{"role": "system", "content": f"Request {i}."}, {"role": "user", "content": QUESTIONS[i]}]


def test_16_concurrent_streaming_clients_get_the_single_process_servers_greedy_replies(cluster, local):
    want_chat = [local.client.chat.completions.create(model=MODEL, messages=chat(i), max_tokens=16,
                                                      temperature=0).choices[0].message.content for i in range(16)]
    want_text = [local.client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text
                 for p in PROMPTS]

    def client(i: int):
        c = cluster.chat.completions.with_raw_response.create(model=MODEL, messages=chat(i), max_tokens=16,
                                                              temperature=0, stream=True)
        t = cluster.completions.with_raw_response.create(model=MODEL, prompt=PROMPTS[i], max_tokens=16,
                                                         temperature=0, stream=True)
        return _stream_text(c), _stream_text(t)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(client, range(16)))
    assert [c[0][0] for c in got] == want_chat
    assert [c[1][0] for c in got] == want_text
    assert all(w for w in want_chat + want_text)  # real text, not empty replies
    used = [r for c in got for _, r in c]
    live = set(replicas())
    assert set(used) <= live and len(live) == 2
    assert all(used.count(r) >= 2 for r in live), f"the load was not spread: {used}"
    # non-streamed replies and the other routes go through the same way
    msgs = [{"role": "user", "content": "Name three colours."}]
    r = cluster.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    want = local.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.choices[0].message.content and r.usage == want.usage
    assert [m.id for m in cluster.models.list()] == [MODEL]
    base = f"http://127.0.0.1:{cluster.port}/purelm"
    health = httpx.get(base + "/health", timeout=30)
    assert health.json()["status"] == "ok" and health.headers["x-purelm-replica"] in live
    assert "purelm_generated_tokens_total" in httpx.get(base + "/metrics", timeout=30).text
    with pytest.raises(openai.NotFoundError, match="does not exist"):  # purelm's own errors come through
        cluster.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_the_replicas_take_the_configs_request_defaults(cluster):
    """The config's sampling defaults and n_predict reach each replica's server (its /props)."""
    for _ in range(4):  # (the router spreads the requests over both replicas)
        params = httpx.get(f"http://127.0.0.1:{cluster.port}/purelm/props", timeout=30).json()[
            "default_generation_settings"]["params"]
        assert (params["seed"], params["n_predict"], params["dry_sequence_breakers"]) == (1234, 400, ["\n"])
        assert params["temperature"] == 0.8


def test_without_prefix_routing_the_replicas_are_the_ingress(cluster, fixtures):
    """purelm's app under serve.ingress as the application's only deployment: Serve's proxy routes to it."""
    model = str(fixtures / "llama-q8_0.gguf")
    serve.run(build_app({"model": model, "prefix_routing": False, "num_cpus": 0.5, "name": "direct"}), name="direct",
              route_prefix="/direct")
    try:
        base = f"http://127.0.0.1:{cluster.port}/direct"
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        want = purelm.load(model, threads=1).generate("Hello there", max_tokens=6, temperature=0)
        raw = client.completions.with_raw_response.create(model="llama-q8_0", prompt="Hello there", max_tokens=6,
                                                          temperature=0, stream=True)
        text, replica = _stream_text(raw)
        assert text == want and replica
        assert httpx.get(base + "/health", timeout=30).json()["status"] == "ok"
        err = httpx.get(base + "/no-such-route", timeout=30)
        assert err.status_code == 404 and err.json()["error"]["code"] == "not_found"
    finally:
        serve.delete("direct")


def test_requests_sharing_a_prefix_land_on_the_replica_that_cached_it(cluster):
    before = replica_stats()
    systems = ["You are a meticulous geography tutor. Answer every question in one short factual sentence, "
               "and never mention that you are an AI model.",
               "You are a pirate who speaks only in rhyming couplets about the sea, ships and treasure, "
               "whatever the question is."]
    landed = {0: [], 1: []}
    for k, system in enumerate(systems):
        for q in QUESTIONS[:5]:
            raw = cluster.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
                max_tokens=4, temperature=0)
            raw.parse()
            landed[k].append(raw.headers["x-purelm-replica"])
    after = replica_stats()
    hits = {rid: after[rid]["prefix_hits"] - before.get(rid, {"prefix_hits": 0})["prefix_hits"] for rid in after}
    for k in (0, 1):
        assert len(set(landed[k])) == 1, f"system prompt {k} went to several replicas: {landed[k]}"
    # every request after a conversation's first reused its cached prefix, on that conversation's replica
    expect = {rid: 0 for rid in after}
    for k in (0, 1):
        expect[landed[k][0]] += 4
    assert hits == expect, (hits, landed)


def test_a_killed_replica_fails_its_request_retryably_and_is_replaced(cluster):
    before = replicas()
    assert len(before) == 2
    raw = cluster.completions.with_raw_response.create(model=MODEL, prompt="Tell me a long story.", max_tokens=400,
                                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    victim = raw.headers["x-purelm-replica"]
    events = raw.parse()
    next(iter(events))  # generating
    t0 = time.monotonic()
    ray.kill(before[victim], no_restart=True)
    with pytest.raises(openai.APIError, match="replica"):  # the stream ends with an error event
        for _ in events:
            pass
    # the service answers again (a request that meets the dead replica gets a 503 the client retries)
    retrying = cluster.with_options(max_retries=10)
    r = retrying.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert r.choices[0].text
    # and Serve starts a new replica in its place
    while True:
        now = replicas()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() - t0 < 60, f"the replica was not replaced within 60 s: {sorted(now)}"
        time.sleep(0.5)
    while serve.status().applications[APP].deployments["PurelmServer"].status != "HEALTHY":
        assert time.monotonic() - t0 < 60, "the deployment did not become healthy within 60 s"
        time.sleep(0.5)
    answered = set()
    while len(answered) < 2:  # both replicas, the new one included, answer
        raw = retrying.completions.with_raw_response.create(model=MODEL, prompt="Hello", max_tokens=2)
        raw.parse()
        answered.add(raw.headers["x-purelm-replica"])
        assert time.monotonic() - t0 < 60, f"only {answered} answered within 60 s"
    assert answered == set(replicas())


N_ITEMS = 500  # 8 blocks, batches of 64, two actors


def test_ray_data_writes_every_completion_exactly_once(cluster, fixtures, tmp_path):
    model = str(fixtures / "llama-q8_0.gguf")
    rows = [{"id": i, "prompt": f"Item {i}: the {['red', 'green', 'blue', 'odd'][i % 4]} one is"}
            for i in range(N_ITEMS)]
    ds = ray.data.from_items(rows, override_num_blocks=8).random_shuffle(seed=1)
    out = process(ds, model=model, concurrency=2, batch_size=64, num_cpus=1, max_tokens=6)
    out.write_parquet(str(tmp_path / "out"))
    import pyarrow.parquet as pq

    table = pq.read_table(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list(range(N_ITEMS)), "a prompt was lost or written twice"
    by_id = {i: (p, t, n) for i, p, t, n in zip(ids, table.column("prompt").to_pylist(),
                                                table.column("text").to_pylist(),
                                                table.column("completion_tokens").to_pylist())}
    llm = purelm.load(model, threads=1)  # as each actor (num_cpus 1)
    for i in list(range(0, N_ITEMS, 47)) + [N_ITEMS - 1]:
        prompt, text, n = by_id[i]
        assert prompt == rows[i]["prompt"]
        llm.reset()  # from an empty cache, as the batch was (see chat() on continued prefixes)
        assert text == llm.generate(prompt, max_tokens=6, temperature=0), i
        assert 1 <= n <= 6


def test_ray_data_chat_and_embeddings_match_the_api(cluster, smollm2_path):
    llm = purelm.load(smollm2_path, n_ctx=N_CTX, threads=1)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    ds = ray.data.from_items([{"id": i, "messages": json.dumps(c)} for i, c in enumerate(convs)])
    got = process(ds, model=str(smollm2_path), task="chat", column="messages", n_ctx=N_CTX, max_tokens=12,
                  batch_size=4).take_all()
    assert sorted(r["id"] for r in got) == [0, 1, 2, 3]
    for r in got:
        llm.reset()  # from an empty cache, as the batch was
        assert r["text"] == llm.chat(convs[r["id"]], max_tokens=12, temperature=0).text
    texts = ["a cat", "a dog sat on the mat"]
    emb = process(ray.data.from_items([{"t": t} for t in texts]), model=str(smollm2_path), task="embedding",
                  column="t", n_ctx=N_CTX).take_all()
    want = llm.embed([r["t"] for r in emb])
    np.testing.assert_allclose(np.stack([r["embedding"] for r in emb]), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ without a cluster
def test_config_is_checked_and_maps_to_serve_options():
    c = RayServeConfig.from_dict({"model": "smollm2", "autoscaling": {"min_replicas": 1, "max_replicas": 4},
                                  "num_cpus": 2, "parallel": 4})
    opts = c.deployment_options()
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert "num_replicas" not in opts and opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert c.load_kwargs()["threads"] == 2 and c.load_kwargs()["backend"] is None
    g = RayServeConfig.from_dict({"num_gpus": 1, "replicas": 3})
    assert g.load_kwargs()["backend"] == "torch" and g.load_kwargs()["device"] == "cuda"
    assert g.deployment_options()["num_replicas"] == 3
    for bad, what in (({"replicas": 0}, "replicas"), ({"num_cpus": -1}, "num_cpus"), ({"parallel": "8"}, "parallel"),
                      ({"replica": 2}, "unknown"), ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_"),
                      ({"autoscaling": {"size": 2}}, "autoscaling"), ({"num_gpus": 1, "backend": "numba"}, "torch"),
                      ({"route_prefix": "v1"}, "route_prefix"), ({"num_cpus": float("nan")}, "num_cpus"),
                      ({"lookup": -1}, "lookup"), ({"lookup": 2.5}, "lookup"),
                      ({"sampling": {"temp": 0}}, "unknown sampling field"), ({"sampling": [1]}, "sampling must"),
                      ({"sampling": {"temperature": -1}}, "sampling.temperature"),
                      ({"sampling": {"logit_bias": {"x": 1}}}, "sampling.logit_bias"),
                      ({"sampling": {"dry_sequence_breakers": "ab"}}, "sampling.dry_sequence_breakers"),
                      ({"n_predict": 0}, "n_predict"), ({"chat_template": "nope"}, "not a built-in"),
                      ({"chat_template": "chatml", "chat_template_text": "x"}, "give one of"),
                      ({"chat_template_text": "{% for %}"}, "syntax error")):
        with pytest.raises(PurelmError, match=what):  # (a template that does not compile: TemplateError)
            RayServeConfig.from_dict(bad)


def test_request_defaults_and_the_template_reach_each_replicas_server(smollm2_path):
    """purelm serve --ray's sampling flags, -n and chat template flags: in the config (a dict, JSON's
    string keys for the bias), then in the replica's model and ServerConfig; a bias outside the
    vocabulary is refused when the replica loads the model."""
    from purelm.integrations.ray.deployment import load_model
    from purelm.sampling import SamplingParams

    d = {"model": str(smollm2_path), "n_ctx": 64, "n_predict": 7, "chat_template": "llama3",
         "sampling": {"temperature": 0.2, "mirostat": 2, "logit_bias": {"15": -1.5, "16": float("-inf")},
                      "dry_sequence_breakers": ["\n"]}}
    c = RayServeConfig.from_dict(json.loads(json.dumps(d)))
    sc = c.server_config()
    assert sc.n_predict == 7 and sc.sampling == SamplingParams(temperature=0.2, mirostat=2,
                                                              logit_bias={15: -1.5, 16: float("-inf")},
                                                              dry_sequence_breakers=("\n",))
    llm = load_model(c)
    assert llm.chat_template.is_builtin and "<|start_header_id|>" in llm.chat_template.source
    text = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    own = load_model(RayServeConfig.from_dict({**d, "chat_template": None, "chat_template_text": text}))
    assert own.tokenizer.decode(own.chat_prompt([{"role": "user", "content": "hi"}])) == "[hi]"
    with pytest.raises(UsageError, match="sampling.logit_bias: token 99999 is outside the vocabulary"):
        load_model(RayServeConfig.from_dict({**d, "sampling": {"logit_bias": {"99999": 1}}}))


def test_router_keys_prompts_by_their_start():
    sys_msg = {"role": "system", "content": "You are helpful. " * 8}
    a = prompt_text({"messages": [sys_msg, {"role": "user", "content": "hi"}]})
    b = prompt_text({"messages": [sys_msg, {"role": "user", "content": "bye"}]})
    ha, hb = block_hashes(a), block_hashes(b)
    common = next(i for i, (x, y) in enumerate(zip(ha, hb)) if x != y) if ha != hb else len(ha)
    assert common >= 4 and len(ha) >= common
    t = PrefixTable(max_blocks=1000)
    t.add(ha, "r1")
    assert t.match(hb, "r1") == common and t.match(hb, "r2") == 0
    assert prompt_text({"prompt": [1, 2, 3]}) == "1,2,3," and prompt_text({"prompt": ["x", "y"]}) == "x"
    assert prompt_text({"input": "x"}) is None and prompt_text([1]) is None
    small = PrefixTable(max_blocks=3)
    small.add(ha, "r1")
    assert len(small.blocks["r1"]) == 3  # least recently used blocks dropped


def test_cli_flags_make_the_config(tmp_path, fixtures):
    from purelm.cli import build_parser
    from purelm.integrations.ray.cli import config_from_args

    model = str(fixtures / "llama-q8_0.gguf")
    a = build_parser().parse_args(["serve", model, "--ray", "--replicas", "2", "--max-replicas", "5", "-c", "256",
                                   "--replica-cpus", "2", "-np", "4", "--no-prefix-routing", "--alias", "tiny",
                                   "--lookup", "6", "-ctk", "f16", "--lora-scaled",
                                   str(fixtures / "peft" / "llama-lora-f32.gguf") + ":0.5"])
    a.model = a.model_pos
    c = config_from_args(a)
    assert c.load_kwargs()["lora"] == [[str(fixtures / "peft" / "llama-lora-f32.gguf"), 0.5]]
    assert (c.load_kwargs()["cache_type_k"], c.load_kwargs()["cache_type_v"]) == ("f16", "f32")
    assert c.server_config().replica  # (POST /lora-adapters would change one replica: refused)
    assert (c.model, c.n_ctx, c.parallel, c.model_name, c.prefix_routing) == (model, 256, 4, "tiny", False)
    assert (c.sampling, c.n_predict, c.chat_template, c.chat_template_text) == (None, None, None, None)
    assert c.lookup == 6 and c.server_config().lookup == 6
    assert c.deployment_options()["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 5,
                                                            "target_ongoing_requests": 4}
    assert c.load_kwargs()["threads"] == 2
    a = build_parser().parse_args(["serve", model, "--ray", "--replicas", "3", "--max-replicas", "2"])
    a.model = a.model_pos
    with pytest.raises(UsageError, match="--max-replicas"):
        config_from_args(a)
    from purelm.cli import _chat_template_option, _sampling_params

    a = build_parser().parse_args(["serve", model, "--ray", "--temp", "0.3", "-l", "5-inf", "--top-k", "40",
                                   "-n", "9", "--chat-template", "chatml"])
    a.model = a.model_pos
    c = config_from_args(a, _sampling_params(a), _chat_template_option(a))
    assert c.sampling == {"temperature": 0.3, "logit_bias": {5: float("-inf")}}  # what differs from the defaults
    assert (c.n_predict, c.chat_template, c.chat_template_text) == (9, "chatml", None)
    with pytest.raises(UsageError, match="task"):
        process(None, model=model, task="summarize")
    with pytest.raises(UsageError, match="temperatur"):
        process(None, model=model, temperatur=0.5)


def test_without_ray_the_import_says_what_to_install():
    import subprocess
    import sys

    code = "import sys; sys.modules['ray'] = None\nimport purelm.integrations.ray"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "RayMissingError" in r.stderr and "pip install 'purelm[ray]'" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None\n"
                        "from purelm.cli import main; sys.exit(main(['serve', 'x.gguf', '--ray']))"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "purelm[ray]" in r.stderr and "Traceback" not in r.stderr
