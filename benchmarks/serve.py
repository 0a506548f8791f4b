"""Benchmark the HTTP API's micro-batching and the engine's document cache.

1. Grid: concurrency 1, 4, 16 x max batch size 1..8. A uvicorn server runs in this process on
   127.0.0.1; client threads (one per concurrent user, in a separate process so that they do not
   compete with the server for its GIL) post `/api/inference/instruct` requests,
   each about a different document (no cache hits), greedy, `max_new_tokens` tokens. For each
   cell: latency p50/p95 (ms, client side), requests/s, mean batch size actually formed.
2. Many questions per document: the same document asked `questions` different questions in a row
   through the engine, with the document cache on and off (render + vision encoding once vs. every
   time), for a short and a long document.
3. Engines: the same requests (same documents and questions) at concurrency 1, 4, 16 against
   `deepsynth serve --engine hf` and `--engine vllm` (the vLLM server runs in the vLLM environment
   made by `make vllm-env`, as a subprocess on 127.0.0.1): requests/s, answer tokens/s and latency
   p50/p95 of each, the vLLM / HF ratio, and how many answers the two servers gave identically.
   Two workloads: short answers (the trained tiny reader, which stops after a few tokens: prefill
   and per-request overhead dominate) and long answers (the random tiny model, which writes until
   the 64-token budget or the loop guard: decoding dominates). `--only-engines` runs this part
   alone; it is skipped (and says so) without the vLLM environment.

Everything runs on one machine in one run, so the ratios mean something even when the machine is
busy (its load average is recorded); absolute numbers do not transfer to other machines.

    python benchmarks/serve.py [--model tiny] [--out benchmarks/serve_report.json]
    python benchmarks/serve.py --only-engines [--engine-model DIR --engine-dtype bfloat16 --max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Only the standard library at import time: the load-generating client runs this file in its own
# process (`--client`), so that client threads do not compete with the server for its GIL.
SRC = str(Path(__file__).resolve().parents[1] / "src")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FACTS = ["The invoice total is {n} dollars.", "It was paid by {name} on {day} March 2024.",
         "The order number is {n}7.", "Shipping took {day} days.", "The customer lives in {city}."]
NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov"]
CITIES = ["Paris", "Lisbon", "Oslo", "Kyoto", "Lima"]
QUESTIONS = ["What is the total?", "Who paid?", "When was it paid?", "What is the order number?",
             "How long did shipping take?", "Where does the customer live?", "Summarize the document.",
             "List the key points.", "Extract the dates.", "Extract the names.", "Extract the amounts.",
             "Is it paid?", "What currency?", "Which month?", "Which year?", "Who is the customer?",
             "What was ordered?", "Any discounts?", "What is the city?", "What is the invoice about?"]


def document(i: int, sentences: int = 3) -> str:
    parts = []
    for k in range(sentences):
        parts.append(FACTS[(i + k) % len(FACTS)].format(n=10 + (i * 7 + k) % 90, name=NAMES[(i + k) % 5],
                                                         day=1 + (i + k) % 28, city=CITIES[(i * 3 + k) % 5]))
    return f"Document {i}. " + " ".join(parts)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def start_server(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def client(url: str, concurrency: int, bodies: list[dict]) -> dict:
    """Post `bodies` with `concurrency` threads; per-request latency (ms) and server fields, in the
    order of `bodies` (None for a request that failed)."""
    results: list[dict | None] = [None] * len(bodies)

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            out = post(url, bodies[i])
        except Exception as exc:
            print(f"request {i} failed: {exc}", file=sys.stderr)
            return
        results[i] = {"ms": (time.perf_counter() - t0) * 1000, "batch_size": out["batch_size"],
                      "new_tokens": out["new_tokens"], "answer": out["answer"]}

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(bodies))))
    return {"seconds": time.perf_counter() - start, "results": results}


def run_cell(url: str, concurrency: int, requests: int, first_doc: int, max_new_tokens: int) -> dict:
    bodies = [{"text": document(first_doc + i), "instruction": QUESTIONS[i % len(QUESTIONS)],
               "max_new_tokens": max_new_tokens} for i in range(requests)]
    proc = subprocess.run([sys.executable, __file__, "--client", url, "--concurrency", str(concurrency)],
                          input=json.dumps(bodies), capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout)
    done = [r for r in out["results"] if r is not None]
    if not done:
        raise RuntimeError(f"every request to {url} failed: {proc.stderr[-2000:]}")
    latencies = [r["ms"] for r in done]
    wall = out["seconds"]
    return {
        "requests": requests, "errors": requests - len(done), "seconds": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "answer_tokens_per_s": round(sum(r["new_tokens"] for r in done) / wall, 1),
        "p50_ms": round(percentile(latencies, 0.5), 1), "p95_ms": round(percentile(latencies, 0.95), 1),
        "mean_ms": round(statistics.mean(latencies), 1),
        "mean_batch_size": round(statistics.mean(r["batch_size"] for r in done), 2),
        "max_batch_size_seen": max(r["batch_size"] for r in done),
        "mean_new_tokens": round(statistics.mean(r["new_tokens"] for r in done), 1),
        "answers": [r["answer"] if r is not None else None for r in out["results"]],
    }


def breakdown(engine, max_new_tokens: int, n: int = 8) -> dict:
    """Where a grid request's time goes, measured on the engine directly (no HTTP): render, vision
    encoding (per page, does not shrink with batching) and generation (batch of 1 vs `n`)."""
    docs = [document(5000 + i) for i in range(n)]
    t = time.perf_counter()
    prepared = [engine.prepare(d) for d in docs]
    render = time.perf_counter() - t
    t = time.perf_counter()
    engine._encode(prepared)
    encode = time.perf_counter() - t
    t = time.perf_counter()
    engine.ask_batch(prepared, ["What is the total?"] * n, max_new_tokens=max_new_tokens)
    batched = time.perf_counter() - t
    t = time.perf_counter()
    for p in prepared:
        engine.ask(p, "What is the total?", max_new_tokens=max_new_tokens)
    single = time.perf_counter() - t
    pages = sum(len(p.pages) for p in prepared)
    return {"documents": n, "pages_per_document": round(pages / n, 2),
            "render_ms_per_document": round(render / n * 1000, 2),
            "encode_ms_per_page": round(encode / pages * 1000, 2),
            "generate_ms_per_request_batch1": round(single / n * 1000, 2),
            f"generate_ms_per_request_batch{n}": round(batched / n * 1000, 2),
            "generation_speedup_from_batching": round(single / batched, 2)}


def cache_benchmark(model: str, questions: int, max_new_tokens: int) -> dict:
    from deepsynth.inference import InstructionEngine

    out = {}
    for label, sentences in (("short", 3), ("long", 14)):
        text = " ".join(document(1000 + k, 3) for k in range(sentences // 3 + 1))
        row = {}
        for cache_pages in (0, 256):
            engine = InstructionEngine(model, cache_pages=cache_pages)
            engine.ask("Warm-up text.", "Warm up?", max_new_tokens=2)
            times = []
            start = time.perf_counter()
            for q in QUESTIONS[:questions]:
                t0 = time.perf_counter()
                answer = engine.ask(text, q, max_new_tokens=max_new_tokens)
                times.append((time.perf_counter() - t0) * 1000)
            total = time.perf_counter() - start
            row["cache_on" if cache_pages else "cache_off"] = {
                "total_s": round(total, 3), "per_question_ms_mean": round(statistics.mean(times), 1),
                "first_question_ms": round(times[0], 1),
                "later_questions_ms_p50": round(percentile(times[1:], 0.5), 1),
                "encoded_pages": engine.cache.stats.encoded_pages,
            }
            row["pages"] = answer.pages
            row["visual_tokens"] = answer.visual_tokens
        row["speedup_total"] = round(row["cache_off"]["total_s"] / row["cache_on"]["total_s"], 2)
        row["speedup_later_questions_p50"] = round(
            row["cache_off"]["later_questions_ms_p50"] / row["cache_on"]["later_questions_ms_p50"], 2)
        out[label] = row
    return {"questions_per_document": questions, "max_new_tokens": max_new_tokens, "documents": out}


def wait_health(base: str, proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"the vLLM server did not answer /health within {timeout} s")


def stop_session(sid: int) -> list[str]:
    """Kill what is left of a stopped server's session (vLLM's engine processes, should the server
    not have stopped them), so that nothing of one measurement runs on into the next; returns the
    command lines that were left."""
    import signal

    ps = subprocess.run(["ps", "-o", "args=", "--sid", str(sid)], capture_output=True, text=True)
    left = [line.strip() for line in ps.stdout.splitlines() if line.strip()]
    if left:
        os.killpg(sid, signal.SIGKILL)
    return left


ENGINE_WORKLOADS = {"short_answers": ("form-reader", 16), "long_answers": ("tiny", 64)}


ENGINE_LEVELS = (1, 4, 16)


def engine_cells(url: str, max_new_tokens: int, levels: tuple[int, ...] = ENGINE_LEVELS) -> list[dict]:
    """Each concurrency of `levels` against one server; each engine gets the same documents and questions."""
    cells, first_doc = [], 20000
    for concurrency in levels:
        requests = max(32, 4 * concurrency)
        post(url, {"text": document(first_doc - 1), "instruction": "Warm up?", "max_new_tokens": max_new_tokens})
        cell = run_cell(url, concurrency, requests, first_doc, max_new_tokens)
        first_doc += requests
        cells.append({"concurrency": concurrency, **cell})
    return cells


def print_cells(name: str, cells: list[dict]) -> None:
    for cell in cells:
        print(f"{name:4s} c={cell['concurrency']:2d}  {cell['requests_per_s']:6.2f} req/s  "
              f"{cell['answer_tokens_per_s']:7.1f} tok/s  p50 {cell['p50_ms']:7.1f} ms  p95 {cell['p95_ms']:7.1f} ms",
              flush=True)


def engine_comparison(model: str, max_new_tokens: int, max_wait_ms: float, max_batch_size: int = 16,
                      dtype: str = "float32", levels: tuple[int, ...] = ENGINE_LEVELS) -> dict:
    """requests/s, tokens/s and p50/p95 at concurrency 1/4/16 for `serve --engine hf` and `--engine vllm`."""
    import socket

    import torch

    from deepsynth.inference.engines import make_engine
    from deepsynth.serve import ServeConfig, create_app
    from deepsynth.vllm.parity import vllm_python

    out: dict = {"model": model, "max_new_tokens": max_new_tokens, "server_max_batch_size": max_batch_size,
                 "max_wait_ms": max_wait_ms,
                 "decoding": f"greedy, {dtype} on both (vLLM's own default turns float32 weights 16-bit)",
                 "documents": "one new document per request, the same for both engines",
                 "threads": {"hf": f"torch intra-op threads {torch.get_num_threads()} (in this process)",
                             "vllm": "vLLM's CPU defaults (its worker binds its own OpenMP threads)"},
                 "engines": {}}
    engine = make_engine(model, "hf", dtype=dtype, cache_pages=0)
    config = ServeConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=256,
                         max_new_tokens=max(max_new_tokens, 16), default_new_tokens=max_new_tokens)
    app = create_app(engine, config)
    server, thread, base = start_server(app)
    out["engines"]["hf"] = engine_cells(base + "/api/inference/instruct", max_new_tokens, levels)
    server.should_exit = True
    thread.join(10)
    app.state.batcher.stop()
    print_cells("hf", out["engines"]["hf"])
    python = vllm_python()
    if python is None:
        out["engines"]["vllm"] = None
        out["skipped"] = "vLLM environment absent (make vllm-env)"
        print("vllm: skipped, no vLLM environment (make vllm-env)", flush=True)
        return out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.Popen([python, "-m", "deepsynth.cli", "serve", "--engine", "vllm", "--model", model,
                             "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-wait-ms",
                             str(max_wait_ms), "--max-queue", "256", "--cache-pages", "0", "--dtype", dtype],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        wait_health(base, proc, timeout=900)
        out["vllm_start_s"] = round(time.perf_counter() - start, 1)
        out["engines"]["vllm"] = engine_cells(base + "/api/inference/instruct", max_new_tokens, levels)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        out["processes_left_after_stop"] = stop_session(proc.pid)
    print_cells("vllm", out["engines"]["vllm"])
    pairs = list(zip(out["engines"]["hf"], out["engines"]["vllm"]))
    out["vllm_over_hf"] = {f"concurrency_{h['concurrency']}": {
        "requests_per_s": round(v["requests_per_s"] / h["requests_per_s"], 2),
        "answer_tokens_per_s": round(v["answer_tokens_per_s"] / h["answer_tokens_per_s"], 2),
        "p95_ms": round(v["p95_ms"] / h["p95_ms"], 2)} for h, v in pairs}
    for h, v in pairs:  # float32 greedy both sides: differences come from batch shapes (see README)
        same = sum(a == b and a is not None for a, b in zip(h["answers"], v["answers"]))
        v["identical_to_hf"] = f"{same}/{len(h['answers'])}"
    out["identical_answers"] = [v["identical_to_hf"] for _, v in pairs]
    for cells in out["engines"].values():
        for cell in cells:
            del cell["answers"]
    print(f"identical answers: {out['identical_answers']}; vLLM/HF: {out['vllm_over_hf']}", flush=True)
    return out


def engine_workloads(max_wait_ms: float, model: str | None = None, max_new_tokens: int = 64,
                     dtype: str = "float32", levels: tuple[int, ...] = ENGINE_LEVELS) -> dict:
    """`engine_comparison` for each of ENGINE_WORKLOADS, or for `model` alone (e.g. a real-size
    bundle on a GPU machine, in bfloat16)."""
    workloads = {"model": (model, max_new_tokens)} if model else ENGINE_WORKLOADS
    return {name: engine_comparison(m, tokens, max_wait_ms, dtype=dtype, levels=levels)
            for name, (m, tokens) in workloads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="Model preset or directory of parts 1-2 (default: tiny, "
                        "random); part 3 runs its two workloads (or --engine-model).")
    parser.add_argument("--out", default=str(Path(__file__).with_name("serve_report.json")))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--engine-model", help="Part 3 on this model alone instead of its two tiny workloads "
                        "(answers --max-new-tokens long).")
    parser.add_argument("--engine-dtype", default="float32", help="Weights' dtype of both servers in part 3.")
    parser.add_argument("--only-engines", action="store_true",
                        help="Run only the HF vs vLLM comparison (part 3) and merge it into --out.")
    parser.add_argument("--levels", default=",".join(map(str, ENGINE_LEVELS)),
                        help="Part 3: client concurrencies, comma-separated (make gpu-check: 1,8,32).")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the load generator
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads were 10x "
                             "slower for the tiny model because each op waits for a descheduled thread)")
    args = parser.parse_args()
    if args.client:
        print(json.dumps(client(args.client, args.concurrency, json.loads(sys.stdin.read()))))
        return
    sys.path.insert(0, SRC)
    import torch

    from deepsynth.inference import InstructionEngine
    from deepsynth.serve import ServeConfig, create_app

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    if args.only_engines:
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.is_file() else {"benchmark": "serve"}
        levels = tuple(int(x) for x in args.levels.split(","))
        report["engines"] = engine_workloads(args.max_wait_ms, args.engine_model, args.max_new_tokens,
                                             args.engine_dtype, levels)
        report["engines"]["loadavg"] = [[round(x, 2) for x in load_start], [round(x, 2) for x in os.getloadavg()]]
        report["engines"]["seconds"] = round(time.perf_counter() - t_start, 1)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out} (engines, {report['engines']['seconds']} s)")
        return

    engine = InstructionEngine(args.model, cache_pages=0)  # every grid request is a new document anyway
    config = ServeConfig(max_batch_size=8, max_wait_ms=args.max_wait_ms, max_queue=256,
                         max_new_tokens=max(args.max_new_tokens, 16), default_new_tokens=args.max_new_tokens)
    app = create_app(engine, config)
    server, thread, base = start_server(app)
    url = base + "/api/inference/instruct"
    for i in range(4):  # warm-up
        post(url, {"text": document(-1 - i), "instruction": "Warm up?", "max_new_tokens": args.max_new_tokens})

    grid = []
    doc_id = 0
    for concurrency in (1, 4, 16):
        requests = max(12, 2 * concurrency)
        for max_batch in range(1, 9):
            app.state.batcher.max_batch_size = max_batch
            cell = run_cell(url, concurrency, requests, doc_id, args.max_new_tokens)
            doc_id += requests
            del cell["answers"]
            grid.append({"concurrency": concurrency, "max_batch_size": max_batch, **cell})
            print(f"c={concurrency:2d} b={max_batch}  p50 {cell['p50_ms']:7.1f} ms  p95 {cell['p95_ms']:7.1f} ms  "
                  f"{cell['requests_per_s']:6.2f} req/s  mean batch {cell['mean_batch_size']:.2f}", flush=True)
    server.should_exit = True
    thread.join(10)
    app.state.batcher.stop()

    engine.cache = type(engine.cache)(1024)
    parts = breakdown(engine, args.max_new_tokens)
    print(f"breakdown: {parts}", flush=True)
    cache = cache_benchmark(args.model, args.questions, args.max_new_tokens)
    engines = engine_workloads(args.max_wait_ms, args.engine_model, args.max_new_tokens, args.engine_dtype)
    for label, row in cache["documents"].items():
        print(f"cache {label}: {row['pages']} pages, total {row['cache_off']['total_s']} s -> "
              f"{row['cache_on']['total_s']} s (x{row['speedup_total']})", flush=True)

    def cell(c: int, b: int) -> dict:
        return next(g for g in grid if g["concurrency"] == c and g["max_batch_size"] == b)

    summary = {
        f"concurrency_{c}": {
            "best_max_batch_size": max(range(1, 9), key=lambda b: cell(c, b)["requests_per_s"]),
            "requests_per_s_batch1": cell(c, 1)["requests_per_s"],
            "requests_per_s_best": max(cell(c, b)["requests_per_s"] for b in range(1, 9)),
            "throughput_gain_batch8_vs_1": round(cell(c, 8)["requests_per_s"] / cell(c, 1)["requests_per_s"], 2),
            "p95_ms_batch1": cell(c, 1)["p95_ms"], "p95_ms_batch8": cell(c, 8)["p95_ms"],
        } for c in (1, 4, 16)
    }
    report = {
        "benchmark": "serve",
        "description": __doc__.strip().split("\n\n")[0],
        "config": {"model": args.model, "render_preset": engine.render_preset, "max_new_tokens": args.max_new_tokens,
                   "max_wait_ms": args.max_wait_ms, "decoding": "greedy", "grid_documents": "one new document per "
                   "request (no cache hits)", "cache_questions": args.questions},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                        "device": str(engine.device), "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                        "note": "measured on a shared machine; compare rows of this run, not absolute numbers"},
        "summary": summary,
        "grid": grid,
        "engine_breakdown": parts,
        "cache": cache,
        "engines": engines,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
