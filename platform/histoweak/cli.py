"""The ``histoweak`` command: ``synth`` and ``tile`` (``train``, ``tune``, ``report`` come with the experiment plane)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

__all__ = ["main"]


def _cmd_synth(args: argparse.Namespace) -> int:
    from histoweak.data.synthetic import synthesize

    overrides = {k: v for k, v in dict(n_slides=args.n_slides, size=args.size, shortcut=args.shortcut).items()
                 if v is not None}
    csv_path = synthesize(args.out, args.preset, seed=args.seed, **overrides)
    print(f"synthetic slides, masks, classes.json and slides.csv written to {Path(args.out).resolve()}")
    print(f"slide list: {csv_path}")
    return 0


def add_tiling_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``histoweak tile`` and ``jobs/tile_slides.py``."""
    from histoweak.slides.tiling import TilingParams

    p.add_argument("slides", help="directory, glob pattern, or CSV (slide_id,path[,mask_path,label,split])")
    p.add_argument("out", help="output directory of the tile table")
    p.add_argument("--masks", help="directory of class-index masks named <slide stem>.tiff or .png")
    p.add_argument("--classes", help="classes.json mapping index -> name (0 = background)")
    p.add_argument("--source", default=None, help="dataset name stored in each row (default: output dir name)")
    p.add_argument("--split", default="train", help="split for slides not given one by a CSV")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    defaults = TilingParams()
    for f in fields(TilingParams):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kind = {int: int, float: float}.get(type(default), str)
        if f.name == "stride":
            kind = int
        p.add_argument(flag, dest=f.name, type=kind, default=default, help=f"(default: {default})")
    p.add_argument("--no-progress", action="store_true")


def run_tiling(args: argparse.Namespace) -> int:
    """Validate everything, tile, print the summary; non-zero exit when any slide failed."""
    from histoweak._ray import init_ray
    from histoweak.data.tiling_job import discover_slides, load_classes, tile_dataset
    from histoweak.slides.tiling import TilingParams

    params = TilingParams(**{f.name: getattr(args, f.name) for f in fields(TilingParams)})
    classes_path = args.classes
    if classes_path is None and str(args.slides).endswith(".csv"):
        guess = Path(args.slides).parent / "classes.json"
        classes_path = guess if guess.is_file() else None
    classes = load_classes(classes_path)
    slides = discover_slides(args.slides, args.masks, args.split)
    init_ray(args.address)
    report = tile_dataset(slides, args.out, params, classes, source=args.source or Path(args.out).name,
                          progress=not args.no_progress)
    ok = sum(e["status"] == "ok" for e in report.slides.values())
    print(f"{report.n_tiles} tiles from {ok}/{len(slides)} slides -> {Path(args.out).resolve()}"
          f" (manifest: {Path(args.out).resolve() / '_manifest.json'})")
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return 1 if report.failures else 0


def build_parser() -> argparse.ArgumentParser:
    from histoweak.data.synthetic import PRESETS

    parser = argparse.ArgumentParser(prog="histoweak", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic H&E-like slides with pixel ground truth")
    p.add_argument("out")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-slides", type=int)
    p.add_argument("--size", type=int, help="level-0 side in pixels")
    p.add_argument("--shortcut", type=float, help="strength of the tissue-amount/tumour correlation, 0-1")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("tile", help="tile slides (and masks) into a Parquet tile table with Ray")
    add_tiling_arguments(p)
    p.set_defaults(func=run_tiling)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # malformed input: one clear line, before any work
        print(f"histoweak {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
