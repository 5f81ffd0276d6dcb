"""``alignkit serve`` vs ``transformers serve``: requests/s and latency at 1, 8 and 32 clients.

Both servers run in their own process on 127.0.0.1, at the same time, serving the same local
model directory (the tiny world's pretrained model; no download: ``transformers serve`` gets
the directory as its forced model, with ``HF_HUB_OFFLINE=1``). This process is the load
generator: ``c`` threads, each on one keep-alive connection, send non-streamed chat
completions (greedy, ``max_tokens`` 32, the world's training questions in turn) until a fixed
number of requests is done. Both servers answer the same prompts greedily, and the mean
completion length per server is recorded to show the work was the same. Each level is split
into rounds that alternate between the servers (A B A B), so drift in a shared machine's speed
hits both.

    serve_c<c>_rps_alignkit_vs_transformers=<alignkit requests/s / transformers requests/s>

    python benchmarks/bench_serve.py [--requests 16 64 128] [--rounds 2] [--max-tokens 32] [--world-seed 0]

``transformers serve`` needs FastAPI and uvicorn (``pip install "transformers[serving]"``);
without them this script stops with that message. Results: ``benchmarks/results/serve.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_common as dc  # noqa: E402 - machine info, versions, atomic JSON

LEVELS = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ``name`` is what the model is called in requests."""

    def __init__(self, label: str, cmd: list[str], port: int, model: str, log: Path) -> None:
        self.label, self.port, self.model = label, port, model
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.out = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 180) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}; its log:\n"
                                 f"{self.log.read_text()[-3000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.label} was not ready after {timeout_s:.0f} s; its log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.out.close()


def run_level(server: Server, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """``requests`` chat completions over ``clients`` keep-alive connections; latency per request."""
    lock = threading.Lock()
    todo = iter(range(requests))
    lat: list[float] = []
    tokens: list[int] = []
    texts: dict[int, str] = {}
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                break
            body = json.dumps({"model": server.model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                               "max_tokens": max_tokens, "temperature": 0})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                with lock:
                    errors.append(repr(e))
                continue
            dt = time.perf_counter() - t0
            with lock:
                if r.status != 200:
                    errors.append(f"{r.status}: {data[:200]!r}")
                    continue
                reply = json.loads(data)
                lat.append(dt)
                tokens.append(reply["usage"]["completion_tokens"])
                texts.setdefault(i % len(prompts), reply["choices"][0]["message"]["content"])
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "lat": lat, "tokens": tokens, "errors": errors, "texts": texts}


def summarise(runs: list[dict], clients: int, requests: int) -> dict:
    """One level's rounds together: requests/s over their summed wall time, percentiles over all requests."""
    lat = [x for r in runs for x in r["lat"]]
    tokens = [x for r in runs for x in r["tokens"]]
    errors = [x for r in runs for x in r["errors"]]
    wall = sum(r["wall_s"] for r in runs)
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return {"clients": clients, "requests": requests, "completed": len(lat), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 3),
            "rounds_requests_per_s": [round(len(r["lat"]) / r["wall_s"], 3) for r in runs],
            "requests_per_s": round(len(lat) / wall, 3) if lat else 0.0,
            "p50_s": round(q[49], 4) if lat else None, "p95_s": round(q[94], 4) if lat else None,
            "max_s": round(max(lat), 4) if lat else None,
            "mean_completion_tokens": round(statistics.fmean(tokens), 2) if tokens else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, nargs=3, default=[16, 64, 128], metavar=("C1", "C8", "C32"),
                   help="requests per concurrency level 1, 8, 32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per level and server")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--out", default=str(dc.REPO / "benchmarks" / "results" / "serve.json"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        print("bench_serve: transformers serve needs FastAPI and uvicorn: pip install \"transformers[serving]\" "
              "(or fastapi and uvicorn)", file=sys.stderr)
        return 2
    from alignkit.world import ensure_tiny

    wdir = ensure_tiny(seed=args.world_seed)
    model_dir = str(Path(wdir) / "model")
    rows = [json.loads(x) for x in (Path(wdir) / "data" / "qa_train.jsonl").read_text().splitlines()]
    prompts = [r["question"] for r in rows[:64]]

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")  # server logs, shown when a server fails to start
    logs = Path(tmp.name)
    pa, pt = _free_port(), _free_port()
    bindir = Path(sys.executable).parent
    servers = {
        "alignkit": Server("alignkit serve", [sys.executable, "-m", "alignkit.generation.serve", model_dir, "--port",
                                              str(pa), "--model-name", "tiny-world"], pa, "tiny-world",
                           logs / "alignkit.log"),
        "transformers": Server("transformers serve", [str(bindir / "transformers"), "serve", model_dir, "--host",
                                                      "127.0.0.1", "--port", str(pt), "--device", "cpu",
                                                      "--log-level", "warning"], pt, model_dir,
                               logs / "transformers.log"),
    }
    results: dict[str, dict[str, dict]] = {k: {} for k in servers}
    load_before = os.getloadavg()
    try:
        for s in servers.values():
            s.wait_ready()
        for s in servers.values():  # warm-up: first-request costs (lazy imports, allocator) out of the numbers
            run_level(s, prompts, 2, 8, args.max_tokens)
        texts: dict[str, dict[int, str]] = {k: {} for k in servers}
        for c, n in zip(LEVELS, args.requests):
            # Rounds alternate between the servers (A B A B ...), so a change in the machine's speed
            # (other load on a shared host) hits both.
            runs: dict[str, list[dict]] = {k: [] for k in servers}
            for i in range(args.rounds):
                for name, s in servers.items():
                    runs[name].append(run_level(s, prompts, c, n // args.rounds + (i < n % args.rounds),
                                                args.max_tokens))
                    texts[name].update(runs[name][-1]["texts"])
            for name, s in servers.items():
                r = results[name][str(c)] = summarise(runs[name], c, n)
                print(f"  c={c:2d} {s.label:18s} {r['requests_per_s']:7.2f} req/s  p50 {r['p50_s']:.3f} s  "
                      f"p95 {r['p95_s']:.3f} s  ({r['completed']}/{n} ok, {r['mean_completion_tokens']} tokens/reply; "
                      f"rounds {r['rounds_requests_per_s']} req/s)", flush=True)
    finally:
        for s in servers.values():
            s.stop()
        tmp.cleanup()
    load_after = os.getloadavg()

    shared = set(texts["alignkit"]) & set(texts["transformers"])
    same = sum(texts["alignkit"][k] == texts["transformers"][k] for k in shared) / max(1, len(shared))
    summary = {}
    print("\nserving, same model, same prompts, greedy, max_tokens "
          f"{args.max_tokens} (alignkit serve | transformers serve):")
    for c in LEVELS:
        a, t = results["alignkit"][str(c)], results["transformers"][str(c)]
        ratio = a["requests_per_s"] / t["requests_per_s"] if t["requests_per_s"] else float("nan")
        summary[f"serve_c{c}_rps_alignkit_vs_transformers"] = round(ratio, 3)
        print(f"  {c:2d} clients: {a['requests_per_s']:6.2f} | {t['requests_per_s']:6.2f} req/s, "
              f"p50 {a['p50_s']:.3f} | {t['p50_s']:.3f} s, p95 {a['p95_s']:.3f} | {t['p95_s']:.3f} s")
    print()
    # As dpo_common.noise_warning: rounds of one server and level that disagree by > 1.5x mean the
    # machine's speed changed under the benchmark (other load), and the ratios are not to be trusted.
    bad = [f"{name} c={c} {min(r['rounds_requests_per_s']):.2f}-{max(r['rounds_requests_per_s']):.2f} req/s"
           for name, per in results.items() for c, r in per.items()
           if min(r["rounds_requests_per_s"]) * 1.5 < max(r["rounds_requests_per_s"])]
    noise = (f"WARNING: rounds disagree by > 1.5x ({'; '.join(bad)}; load average {load_before[0]:.1f} -> "
             f"{load_after[0]:.1f} on {os.cpu_count()} cores): re-run on a quiet machine") if bad else None
    if noise:
        print(noise)
    for k, v in summary.items():
        print(f"{k}={v:.3f}")
    report = {"benchmark": "benchmarks/bench_serve.py", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": dc.machine_info(), "versions": dc.versions(),
              "settings": {"model": model_dir, "world_seed": args.world_seed, "levels": list(LEVELS),
                           "requests": dict(zip(map(str, LEVELS), args.requests)), "max_tokens": args.max_tokens,
                           "request": "non-streamed chat completion, temperature 0, one keep-alive connection "
                                      "per client", "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                           "rounds": args.rounds},
              "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)], "noise_warning": noise,
              "same_greedy_text_fraction": round(same, 3), "prompts_compared": len(shared),
              "results": results, "summary": summary}
    print(f"results: {dc.write_json(report, Path(args.out))}")
    print(f"bench_serve took {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
