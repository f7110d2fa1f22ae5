"""Shared helpers for benchmarks: a cached benchmark slide, timing, result tables."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
RESULTS = ROOT / "results"

for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)


def bench_slide(size: int) -> Path:
    """A synthetic H&E slide of ``size``² pixels, rendered once and cached."""
    from histoweak.data.synthetic import synthesize

    out = CACHE / f"slide-{size}"
    csv_path = out / "slides.csv"
    if not csv_path.exists():
        synthesize(out, "default", seed=11, n_slides=1, size=size, splits=(1.0, 0.0, 0.0))
    return next((out / "slides").glob("*.tiff"))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def report(name: str, rows: list[dict], notes: dict | None = None) -> None:
    """Print a table and write ``results/<name>.json``."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print(f"\n== {name} ==")
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))
    for k, v in (notes or {}).items():
        print(f"{k}: {_fmt(v)}")
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "notes": notes or {}, **meta}, indent=2))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
