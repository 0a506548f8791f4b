"""Replay hostile and careless inputs (issue 14's table, the server's rows) against a running server.

A server (`create_app` around the `tiny` model with the ServeConfig defaults) runs in a child
process on 127.0.0.1; this process sends
each input and records, per input: the HTTP status (or what happened), the seconds until the
answer, and the server's resident memory (VmRSS, from /proc) before and after, plus its peak.

Budget checked (issue 14): every input answered within 2 s, and the server's RSS back within
200 MB of its start after the run.

    python benchmarks/hostile.py [--out benchmarks/hostile_report.json]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "tests"))
from inference import helpers  # noqa: E402  (the tests' document builders: the same hostile PDFs)

BUDGET_SECONDS = 2.0
BUDGET_RSS_MB = 200
GOOD_DOC = "alpha: 12\nbravo: 34\ndelta: 56\necho: 78"


# --------------------------------------------------------------------------- inputs


def png(width: int, height: int, colour=(255, 255, 255)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def shared_stream_pdf(n_pages: int, n_glyphs: int) -> bytes:
    """`n_pages` pages that all draw one FlateDecode content stream of `n_glyphs` one-glyph text runs."""
    return helpers.shared_stream_pdf(n_pages, helpers.glyph_stream(n_glyphs))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- server (child process)


def serve(port: int) -> None:
    import torch
    import uvicorn

    from deepsynth.inference import InstructionEngine
    from deepsynth.serve import ServeConfig, create_app

    torch.set_num_threads(1)
    engine = InstructionEngine("tiny")
    app = create_app(engine, ServeConfig.from_env())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} for pid {pid}")


# --------------------------------------------------------------------------- client


def request(base: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def summary(status: int, body: dict) -> dict:
    if status == 200:
        return {"status": status, **{k: body[k] for k in ("pages", "stopped", "new_tokens") if k in body}}
    return {"status": status, "error": body.get("error"), "field": body.get("field"), "limit": body.get("limit"),
            "message": body.get("message")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "hostile_report.json"))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("DEEPSYNTH_API_KEY", None)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                              env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                request(base, "/health", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("the server did not start")
                time.sleep(0.2)
        warm = request(base, "/api/inference/instruct", {"text": GOOD_DOC, "instruction": "alpha?"})
        assert warm[0] == 200, warm
        start_rss = rss_mb(server.pid)

        sliver = png(1, 16_000)
        big_pages = [b64(png(4_000, 4_000, (i * 15, 0, 0))) for i in range(16)]
        glyph_pdf = shared_stream_pdf(16, 10_000_000)
        one_page_pdf = shared_stream_pdf(1, 30_000_000)
        object_pdf = shared_stream_pdf(16, 250_000)

        def batched_sliver() -> dict:
            bodies = [{"pages": [b64(png(64, 64, (i * 40, 0, 0)))], "instruction": "Q", "max_new_tokens": 8}
                      for i in range(4)]
            bodies.insert(2, {"pages": [b64(sliver)], "instruction": "Q", "max_new_tokens": 8})
            with ThreadPoolExecutor(5) as pool:
                results = list(pool.map(lambda b: request(base, "/api/inference/instruct", b), bodies))
            return {"status": [s for s, _ in results], "sliver": summary(*results[2])}

        def distinct_renders() -> dict:
            statuses, seconds = [], []
            for i in range(8):
                body = {"pages": [b64(png(4_000, 4_000, (0, i * 30, 0)))]}
                t = time.perf_counter()
                statuses.append(request(base, "/api/render", body)[0])
                seconds.append(time.perf_counter() - t)
            return {"status": statuses, "seconds_per_request": [round(x, 3) for x in seconds],
                    "budget_seconds": max(seconds)}

        cases = [
            ("one 16,000-character word, no spaces", lambda: summary(*request(
                base, "/api/inference/instruct", {"text": "w" * 16_000, "instruction": "Q"}))),
            ("one 100,000-character word (the text limit)", lambda: summary(*request(
                base, "/api/inference/instruct", {"text": "w" * 100_000, "instruction": "Q"}))),
            (f"a {len(sliver)}-byte 1x16000 PNG page", lambda: summary(*request(
                base, "/api/inference/instruct", {"pages": [b64(sliver)], "instruction": "Q"}))),
            ("the 1x16000 page batched with 4 good requests", batched_sliver),
            (f"16 pages of 16 megapixels in one {sum(map(len, big_pages)) / 1e6:.1f} MB request",
             lambda: summary(*request(base, "/api/inference/instruct",
                                      {"pages": big_pages, "instruction": "Q", "max_new_tokens": 8}))),
            ("distinct 4000x4000 PNGs to /api/render, x8", distinct_renders),
            (f"a {len(glyph_pdf) // 1000} KB PDF whose 16 pages share a 10M-glyph content stream",
             lambda: summary(*request(base, "/api/inference/instruct",
                                      {"pdf": b64(glyph_pdf), "instruction": "Q"}))),
            (f"a {len(one_page_pdf) // 1000} KB one-page PDF of 30M glyphs",
             lambda: summary(*request(base, "/api/inference/instruct",
                                      {"pdf": b64(one_page_pdf), "instruction": "Q"}))),
            (f"a {len(object_pdf) // 1000} KB PDF whose 16 pages share a 250k-object stream (within the byte limit)",
             lambda: summary(*request(base, "/api/inference/instruct", {"pdf": b64(object_pdf), "instruction": "Q"}))),
            (f"4 pages of 16 megapixels in one {sum(map(len, big_pages[:4])) / 1e6:.1f} MB request (within limits)",
             lambda: summary(*request(base, "/api/inference/instruct",
                                      {"pages": big_pages[:4], "instruction": "Q", "max_new_tokens": 8}))),
        ]
        rows = []
        for name, run in cases:
            before = rss_mb(server.pid)
            t = time.perf_counter()
            outcome = run()
            seconds = time.perf_counter() - t
            rows.append({"input": name, **outcome, "seconds": round(outcome.pop("budget_seconds", seconds), 3),
                         "rss_before_mb": before,
                         "rss_after_mb": rss_mb(server.pid), "rss_peak_so_far_mb": rss_mb(server.pid, "VmHWM")})
            print(json.dumps(rows[-1]), flush=True)
        end_rss = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)

    timed = rows
    report = {
        "what": "issue 14's hostile inputs against `create_app` around the tiny model on 127.0.0.1 "
                "(ServeConfig defaults)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "budget": {"seconds_per_input": BUDGET_SECONDS, "rss_back_within_mb": BUDGET_RSS_MB},
        "rows": rows,
        "not_replayed": "the cancellation rows (client left, 504): the tiny model's answers end in well under a "
                        "second, so a replay cannot tell cancelled from finished; tests/serve/test_hostile.py checks "
                        "both with a model that waits for its request's cancel signal",
        "rss_start_mb": start_rss,
        "rss_end_mb": end_rss,
        "rss_peak_mb": max(r["rss_peak_so_far_mb"] for r in rows),
        "within_budget": {
            "every_input_within_seconds": all(r["seconds"] <= BUDGET_SECONDS for r in timed),
            "slowest_input_seconds": max(r["seconds"] for r in timed),
            "rss_back_within_mb": round(end_rss - start_rss, 1) <= BUDGET_RSS_MB,
            "rss_growth_mb": round(end_rss - start_rss, 1),
        },
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["within_budget"]))


if __name__ == "__main__":
    main()
