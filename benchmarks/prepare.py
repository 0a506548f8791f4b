"""Benchmark ``deepsynth prepare``: examples/s for convert-only and convert+render with the local
engine at ``num_proc`` 1 and 2 and with the Ray engine at 1 and 2 workers, and Ray's start-up
overhead, in one run, to a JSON report.

Input: a synthetic SQuAD-v2-schema JSONL file (English-like contexts of 80-220 words, about one
``base`` page each; 1 in 10 questions unanswerable and skipped). Every configuration runs
``deepsynth.data.prepare.prepare`` end to end on the same file with a fresh ``datasets`` cache and
a fresh output folder, so each time includes loading the JSONL into Arrow, conversion and
validation (``datasets.map``), for the render runs laying out, drawing and PNG-encoding every page
(preset ``base``: 640x640), and writing the Parquet shards. Rates are examples written per second
of wall-clock time, and per CPU-second (this process plus its map workers). The machine's load
average and a pure-CPU two-process calibration are recorded: other work on the cores lowers the
``num_proc=2`` gain. The Ray runs (``--engine ray``, skipped when Ray is not installed) use a local
Ray instance of 1, then 2 CPUs, started before the runs: their rates exclude the start-up, which is
reported on its own (``ray.init`` plus a first one-row Ray Data job), and their CPU time is not
counted (Ray's workers are not children of this process).

    python benchmarks/prepare.py [--out benchmarks/prepare_report.json] [--convert-n 40000] [--render-n 600]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import multiprocessing
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepsynth.data.prepare import prepare  # noqa: E402

logger = logging.getLogger("benchmarks.prepare")


def make_squad(path: Path, n: int, seed: int = 0) -> None:
    """``n`` SQuAD-v2-schema records; every 10th is unanswerable."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(3000)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = [rng.choice(vocab) for _ in range(rng.randint(80, 220))]
            k = rng.randrange(len(words) - 3)
            answer = " ".join(words[k:k + 3])
            context = " ".join(words)
            unanswerable = i % 10 == 9
            rec = {"id": f"q{i:07d}", "title": f"doc {i // 4}", "context": context,
                   "question": f"Which three words follow position {k}?",
                   "answers": {"text": [] if unanswerable else [answer],
                               "answer_start": [] if unanswerable else [context.index(answer)]}}
            f.write(json.dumps(rec) + "\n")


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the datasets.map workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _spin(_: int) -> int:
    s = 0
    for i in range(2_000_000):
        s += i * i
    return s


def parallel_efficiency() -> float:
    """How much of a second core this process can get now: (time of 1 task) / (time of 2 tasks
    in 2 processes); 1.0 on two free cores, about 0.5 when the cores are busy with other work."""
    t0 = time.perf_counter()
    _spin(0)
    one = time.perf_counter() - t0
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [0, 1])
        two = time.perf_counter() - t0
    return round(one / two, 2)


def run_one(src: Path, work: Path, *, render: bool, num_proc: int, n: int, engine: str = "local") -> dict[str, Any]:
    tag = f"{engine}-{'render' if render else 'convert'}-np{num_proc}"
    out, cache = work / f"out-{tag}", work / f"cache-{tag}"
    t0, c0 = time.perf_counter(), _cpu_seconds()
    res = prepare(str(src), out, limit=n, render=render, preset="base", num_proc=num_proc, shard_size=1000,
                  cache_dir=str(cache), progress=False, engine=engine)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    size = sum(p.stat().st_size for p in (out / "data").glob("*.parquet"))
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    row = {"engine": engine, "mode": "convert+render" if render else "convert",
           ("num_proc" if engine == "local" else "ray_workers"): num_proc, "input_records": n,
           "examples": res.examples, "skipped": res.skipped, "seconds": round(seconds, 3),
           "examples_per_s": round(res.examples / seconds, 1), "parquet_bytes": size,
           "bytes_per_example": round(size / max(1, res.examples))}
    if engine == "local":
        row.update(cpu_seconds=round(cpu, 3), examples_per_cpu_s=round(res.examples / cpu, 1))
    return row


def ray_runs(src: Path, work: Path, convert_n: int, render_n: int) -> tuple[list[dict], list[dict]]:
    """The Ray engine at 1 and 2 workers (a local instance of that many CPUs, started first, timed
    apart: ``ray.init`` and a first one-row Ray Data job)."""
    import ray

    runs, startups = [], []
    for workers in (1, 2):
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, object_store_memory=400 * 1024 * 1024,
                 log_to_driver=False)
        init_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        ray.data.range(1).map_batches(lambda b: b).materialize()
        first_job_s = time.perf_counter() - t1
        startups.append({"ray_workers": workers, "init_seconds": round(init_s, 2),
                         "first_job_seconds": round(first_job_s, 2),
                         "seconds": round(init_s + first_job_s, 2)})
        try:
            for render, n in ((False, convert_n), (True, render_n)):
                r = run_one(src, work, render=render, num_proc=workers, n=n, engine="ray")
                logger.warning("%s", r)
                runs.append(r)
        finally:
            ray.shutdown()
    return runs, startups


def break_even(startup_s: float, local_rate: float, ray_rate: float) -> int | None:
    """Examples from which a Ray run (start-up + examples at ``ray_rate``) ends before a local run
    at ``local_rate``; None when Ray's rate is not higher (it never catches up)."""
    if ray_rate <= local_rate:
        return None
    return math.ceil(startup_s / (1 / local_rate - 1 / ray_rate))


def _ray_summary(local: dict, runs: list[dict], startups: list[dict]) -> dict[str, Any]:
    ray_by = {(r["mode"], r["ray_workers"]): r for r in runs}
    startup = max(s["seconds"] for s in startups)
    summary: dict[str, Any] = {"runs": runs, "startup": startups, "startup_seconds_max": startup,
                               "rate_vs_local": {}, "break_even_examples": {}}
    for mode in ("convert", "convert+render"):
        for w in (1, 2):
            ray_rate, local_rate = ray_by[(mode, w)]["examples_per_s"], local[(mode, w)]["examples_per_s"]
            key = f"{mode} ray_workers={w} vs num_proc={w}"
            summary["rate_vs_local"][key] = round(ray_rate / local_rate, 2)
            summary["break_even_examples"][key] = break_even(startup, local_rate, ray_rate)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("prepare_report.json")))
    parser.add_argument("--convert-n", type=int, default=40000, help="Input records for the convert-only runs.")
    parser.add_argument("--render-n", type=int, default=600, help="Input records for the render runs.")
    parser.add_argument("--no-ray", action="store_true", help="Skip the Ray engine runs.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        import ray  # noqa: F401
        with_ray = not args.no_ray
    except ImportError:
        logger.warning("Ray is not installed (pip install 'deepsynth[cluster]'): the Ray runs are skipped")
        with_ray = False
    import datasets

    datasets.disable_progress_bars()
    load_start = [round(x, 2) for x in os.getloadavg()]
    efficiency_start = parallel_efficiency()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        src = work / "squad.jsonl"
        make_squad(src, max(args.convert_n, args.render_n))
        runs = []
        for render, n in ((False, args.convert_n), (True, args.render_n)):
            for num_proc in (1, 2):
                r = run_one(src, work, render=render, num_proc=num_proc, n=n)
                logger.warning("%s", r)
                runs.append(r)
        ray_report, startups = ray_runs(src, work, args.convert_n, args.render_n) if with_ray else ([], [])
    by = {(r["mode"], r["num_proc"]): r for r in runs}
    report = {
        "benchmark": "prepare",
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "runs": runs,
        "speedup_num_proc_2": {
            mode: round(by[(mode, 2)]["examples_per_s"] / by[(mode, 1)]["examples_per_s"], 2)
            for mode in ("convert", "convert+render")
        },
        "render_cost_ratio_np1": round(by[("convert", 1)]["examples_per_s"] / by[("convert+render", 1)]["examples_per_s"], 1),
        "ray": _ray_summary(by, ray_report, startups) if with_ray else None,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "load_average_start": load_start,
                    "load_average_end": [round(x, 2) for x in os.getloadavg()],
                    "two_process_cpu_efficiency": [efficiency_start, parallel_efficiency()],
                    "datasets": datasets.__version__},
        "note": "one run per configuration. two_process_cpu_efficiency (start, end) is a pure-CPU calibration "
                "in the same run: 1.0 means a second core was free, about 0.5 means two processes shared one "
                "core; a num_proc=2 gain above it is not possible. cpu_seconds count this process and its "
                "finished map workers, so examples_per_cpu_s shows the work itself, independent of sharing. "
                "Ray rates exclude Ray's start-up (ray.startup); break_even_examples is derived from the measured "
                "rates: the job size from which start-up + examples at the Ray rate ends before the local run "
                "(null: the Ray rate is not higher, so on this machine it never does).",
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("runs", "speedup_num_proc_2", "render_cost_ratio_np1", "ray",
                                             "total_seconds")}, indent=1))
    return report


if __name__ == "__main__":
    main()
