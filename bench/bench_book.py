"""Time of a whole book from a fresh clone and a fresh cache: every chapter executed, then rendered.

1. Copy the checkout's tracked files (``git ls-files``, with the working tree's edits) into a
   temporary folder: a fresh clone, without results.
2. Run the book's command there, ``quarto render --profile <profile>`` (its pre-render executes
   every chapter), with a fresh ``C2SREPRO_CACHE`` (the models are trained and the inputs fetched
   again), and Quarto's Python set to this one; the terminal's output goes to a file. While it
   runs, the load average is sampled every 10 s: a shared machine makes every time longer.
3. Write ``bench/book/<profile>.json``: the total seconds, each chapter's wall and CPU seconds (the
   kernel's user + system time, from the runner's ``runs.json``), the rendering's share (the
   total less the chapters), the machine's cores, the mean and peak load average, and the
   commit; and ``bench/book/<profile>.log``: what the terminal showed.

Usage: python bench/bench_book.py [--profile default] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent / "book"


def fresh_clone(target: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return head + ("+uncommitted changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--keep", type=Path, help="make the fresh clone here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    if shutil.which("quarto") is None:
        sys.exit("quarto is not on PATH: `make quarto`, then put .cache/quarto/bin on PATH")
    with tempfile.TemporaryDirectory(prefix="c2srepro-book-") as scratch:
        clone = args.keep or Path(scratch) / "clone"
        clone.mkdir(parents=True, exist_ok=True)
        fresh_clone(clone)
        loads: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(10):
                loads.append(os.getloadavg()[0])

        threading.Thread(target=sample, daemon=True).start()
        env = {**os.environ, "C2SREPRO_CACHE": str(Path(scratch) / "cache"), "QUARTO_PYTHON": sys.executable}
        env.pop("PYTHONPATH", None)  # the clone's own c2srepro
        started = time.perf_counter()
        with open(Path(scratch) / "terminal.log", "w") as terminal:
            run = subprocess.run(["quarto", "render", "--profile", args.profile], cwd=clone, env=env,
                                 stdout=terminal, stderr=subprocess.STDOUT)
        total = time.perf_counter() - started
        done.set()
        shown = (Path(scratch) / "terminal.log").read_text()
        if run.returncode != 0:
            sys.exit(f"quarto render failed ({run.returncode}):\n{shown[-3000:]}")
        runs = json.loads((clone / "results" / args.profile / "book" / "runs.json").read_text())
        chapters = {name: {"seconds": record["seconds"], "cpu_seconds": record.get("cpu_seconds")}
                    for name, record in runs.items()}
        report = {
            "profile": args.profile, "total_seconds": round(total, 1),
            "chapters": chapters,
            "rendering_seconds": round(total - sum(r["seconds"] for r in runs.values()), 1),
            "cores": os.cpu_count(), "load_average_mean": round(sum(loads) / max(len(loads), 1), 2),
            "load_average_peak": round(max(loads, default=0.0), 2), "terminal_lines": len(shown.splitlines()),
            "commit": commit(),
        }
        OUT.mkdir(exist_ok=True)
        (OUT / f"{args.profile}.json").write_text(json.dumps(report, indent=1) + "\n")
        (OUT / f"{args.profile}.log").write_text(shown)
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
