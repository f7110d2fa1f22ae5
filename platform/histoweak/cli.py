"""The ``histoweak`` command: ``synth``, ``tile``, ``import``, ``train``, ``tune``, ``report``, ``analyze``, ``predict``,
``local-cluster``."""

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
    """Arguments shared by ``histoweak tile`` and ``jobs/tile_slides.py``.

    One option per ``TilingParams`` field: its help is the field's entry in the class docstring, its
    choices (if any) ``PARAM_CHOICES``, the set the field's validator checks.
    """
    from histoweak.slides.tiling import PARAM_CHOICES, TilingParams

    p.add_argument("slides", help="directory, glob pattern, or CSV (slide_id,path[,mask_path,label,split]); "
                                  "local files (OpenSlide reads only local files)")
    p.add_argument("out", help="output directory of the tile table, or a URI (s3://bucket/prefix; credentials and "
                               "endpoint from the environment, e.g. AWS_ENDPOINT_URL)")
    p.add_argument("--masks", help="directory of class-index masks named <slide stem>.tiff or .png")
    p.add_argument("--classes", help="classes.json mapping index -> name (0 = background)")
    p.add_argument("--source", default=None, help="dataset name stored in each row (default: output dir name)")
    p.add_argument("--split", default="train", help="split for slides not given one by a CSV (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    defaults, docs = TilingParams(), _attribute_docs(TilingParams)
    for f in fields(TilingParams):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        annotation = str(f.type)  # "int", "float | None", "Mode", ...
        kind = int if annotation.startswith("int") else float if annotation.startswith("float") else str
        help_ = docs.get(f.name, "") + (" (default: %(default)s)" if default is not None else "")
        p.add_argument(flag, dest=f.name, type=kind, default=default, choices=PARAM_CHOICES.get(f.name), help=help_)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{name: text}`` from the numpydoc ``Attributes`` section of ``cls``'s docstring, one line each.

    Written for argparse help: inline-literal marks dropped, ``%`` escaped.
    """
    import inspect
    import re

    section = (inspect.getdoc(cls) or "").partition("Attributes\n----------\n")[2]
    docs: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        m = re.match(r"(\w+) : (.*)", line)
        if m:
            name = m.group(1)
            docs[name] = m.group(2)
        elif name and line.startswith(" "):
            docs[name] += " " + line.strip()
        elif line.strip():
            break  # the next section
    return {k: v.replace("``", "").replace("%", "%%").rstrip(".") for k, v in docs.items()}


def add_tune_arguments(p: argparse.ArgumentParser, default_space: str | None = None) -> None:
    """Arguments shared by ``histoweak tune`` and ``jobs/tune_*.py``."""
    if default_space:
        p.add_argument("search_space", nargs="?", default=default_space)
    else:
        p.add_argument("search_space", help="search_spaces/<name>.yaml")
    p.add_argument("--data", default=None,
                   help="tile table, or synthetic:<preset> (default: the search space's `data`, else the embedded dataset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="fix a setting, e.g. --set hparams.backbone=resnet50 --set train.epochs=10 (repeatable)")
    p.add_argument("--seeds", type=int, default=None, help="repeat every configuration with seeds 0..N-1")
    p.add_argument("--storage", default=None,
                   help="Ray Tune/Train results, one directory per sweep identity: a directory, or a URI every node "
                        "sees on a cluster (s3://bucket/prefix); default: $HISTOWEAK_HOME/ray_results, else "
                        ".cache/ray_results here, or ~/.histoweak/ray_results when run from a copy Ray made of a "
                        "submitted job's --working-dir")
    p.add_argument("--restart", action="store_true",
                   help="start this sweep afresh, discarding its earlier Ray results (default: resume it when the "
                        "search space, data and code are the same)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_cpus_argument(p)
    p.add_argument("--smoke-test", action="store_true", help="apply the file's `smoke:` overrides, tiny data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and Ray Tune's status tables")
    p.add_argument("--stage2", action="store_true",
                   help="then run the method's second stage from the best trial, with the search space's `stage2:` "
                        "settings (PSCL: a decoder on its pseudo-labels)")


def add_cpus_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpus", type=float, default=None,
                   help="on an autoscaling cluster: ask the autoscaler for this many CPUs in all and wait for them "
                        "(at most 10 min) before planning the run; released when it ends")


def run_tiling(args: argparse.Namespace) -> int:
    """Validate everything, tile, print the summary; non-zero exit when any slide failed."""
    from histoweak import _storage
    from histoweak._ray import init_ray
    from histoweak.data.tiling_job import MANIFEST, discover_slides, load_classes, tile_dataset
    from histoweak.slides.tiling import TilingParams

    params = TilingParams(**{f.name: getattr(args, f.name) for f in fields(TilingParams)})
    classes_path = args.classes
    if classes_path is None and str(args.slides).endswith(".csv"):
        guess = Path(args.slides).parent / "classes.json"
        classes_path = guess if guess.is_file() else None
    classes = load_classes(classes_path)
    slides = discover_slides(args.slides, args.masks, args.split)
    out = _storage.resolve(args.out)  # a URI with credentials in it fails here, before Ray starts
    init_ray(args.address)
    report = tile_dataset(slides, out, params, classes, source=args.source or _storage.name(out),
                          progress=not args.no_progress)
    ok = sum(e["status"] == "ok" for e in report.slides.values())
    print(f"{report.n_tiles} tiles from {ok}/{len(slides)} slides -> {report.out_dir}"
          f" (manifest: {_storage.join(report.out_dir, MANIFEST)})")
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return 1 if report.failures else 0


#: the embedded slide presets' size for --smoke-test: few small slides, every split with both labels
SMOKE_SLIDES = dict(n_slides=12, size=1024)


def resolve_data(data: str | None, smoke: bool = False, address: str | None = None) -> tuple[str, int]:
    """A tile table path and its class count; a missing or malformed table fails (``ValueError``) before Ray starts.

    ``data``: a tile table; ``synthetic:<preset>`` for an embedded synthetic dataset (tiled on first
    use, on the Ray cluster at ``address``); None for the default one. ``smoke`` makes the synthetic data small.
    """
    from histoweak._ray import init_ray
    from histoweak.data.defaults import default_tile_table, n_classes_of

    if data is None or data.startswith("synthetic:"):
        from histoweak.data.defaults import PATCH_PRESETS, SLIDE_PRESETS, default_slide_table

        preset, knobs = parse_data_spec(data or "synthetic:default")
        init_ray(address)
        if preset in SLIDE_PRESETS:  # served as a slide table (whole-slide methods): nothing is tiled
            table = str(default_slide_table(preset=preset, **{**knobs, **(SMOKE_SLIDES if smoke else {})}))
        elif preset in PATCH_PRESETS:
            table = str(default_tile_table(preset=preset, **knobs))
        elif preset == "default" and smoke and not knobs:
            table = str(default_tile_table(preset="tiny"))
        else:
            table = str(default_tile_table(preset=preset, **{**knobs, **(dict(n_slides=5, size=1024) if smoke else {})}))
    else:
        table = data
    from histoweak import _storage

    if _storage.is_remote(table):  # n_classes_of reads local tables only
        from histoweak.data.tiling_job import MANIFEST, read_manifest

        manifest = _storage.join(table, MANIFEST)  # refuses a URI with credentials in it
        try:
            return table, len(read_manifest(table)["classes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest}: not a readable histoweak tile table ({type(exc).__name__}: {exc})") from None
    return table, n_classes_of(table)


def parse_data_spec(data: str) -> tuple[str, dict]:
    """``synthetic:<preset>[?<knob>=<value>&...]`` -> (preset, knobs), e.g. ``synthetic:gerne?shortcut=0.8``: the
    preset with some of its knobs (``data.synthetic.SynthPreset`` fields) changed, cached apart from the preset.
    ``ValueError`` names an unknown preset, an unknown knob or a bad value, before any work."""
    import dataclasses

    import yaml

    from histoweak.data.defaults import PATCH_PRESETS
    from histoweak.data.synthetic import PRESETS

    name, _, query = data.removeprefix("synthetic:").partition("?")
    if name not in PRESETS and name not in PATCH_PRESETS:
        raise ValueError(f"--data {data}: unknown synthetic preset; valid: "
                         f"{', '.join('synthetic:' + p for p in sorted([*PRESETS, *PATCH_PRESETS]))}")
    knobs = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--data {data}: {item!r}: give knobs as <knob>=<value>, e.g. synthetic:gerne?shortcut=0.8")
        parsed = yaml.safe_load(value)
        knobs[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    valid = set(PATCH_PRESETS[name]) if name in PATCH_PRESETS else {f.name for f in dataclasses.fields(PRESETS[name])} - {"name"}
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise ValueError(f"--data {data}: unknown knob(s) {unknown} of preset {name!r}; valid: {sorted(valid)}")
    if name in PRESETS and knobs:
        try:
            dataclasses.replace(PRESETS[name], **knobs)  # the preset checks its values
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--data {data}: {exc}") from None
    return name, knobs


def parse_overrides(items: list[str]) -> dict:
    """``["hparams.lr=1e-3", "train.epochs=5"]`` -> ``{"hparams.lr": 0.001, "train.epochs": 5}`` (YAML values)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: use <key>=<value>, e.g. hparams.lr=1e-3 or metric=val_miou_fg")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; a user means the number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def cmd_slides(args: argparse.Namespace) -> int:
    """A slide table (one row per slide, nothing tiled) for whole-slide methods (MagNets): from a CSV
    (slide_id,path,label,split[,size_class,center]) or from Camelyon16/17's layouts."""
    from histoweak.data.slide_table import slide_table_from_csv

    if args.source == "csv":
        if not args.csv:
            raise ValueError("histoweak slides csv: give the CSV (--csv FILE)")
        report = slide_table_from_csv(args.csv, args.out)
    else:
        from histoweak.data.sources.camelyon import camelyon_slide_table

        if not (args.c16 or args.c17):
            raise ValueError("histoweak slides camelyon: give --c16 ROOT and/or --c17 ROOT")
        report = camelyon_slide_table(args.c16, args.c17, args.out, seed=args.seed)
    print(f"{report.written} slides -> {Path(report.out_dir).resolve()}"
          + (f"; {len(report.failures)} failed (listed in its _manifest.json):" if report.failures else ""))
    for f in report.failures:
        print(f"  {f.get('path') or f.get('slide_id')}: {f['problem']}", file=sys.stderr)
    return 1 if report.failures else 0


def cmd_import(args: argparse.Namespace) -> int:
    """A patch dataset -> tile table; a slide dataset -> ``<out>/_prepared/`` (slides.csv, masks) -> tiled into ``<out>``.

    The preparation is reused when ``<out>/_prepared/source.json`` names the same source and root, so a failed
    or interrupted tiling resumes by running the same command again.
    """
    import json

    from histoweak.data.sources import FOLDER_SOURCES, SLIDE_SOURCES, convert_source, prepare_slide_source

    if args.source in FOLDER_SOURCES:
        opts = folder_import_parser(args.source).parse_args(args.tiling)
        classes = [c.strip() for c in opts.classes.split(",")] if opts.classes else None
        report = convert_source(args.source, args.root, args.out, progress=True, val_fraction=opts.val_fraction,
                                test_fraction=opts.test_fraction, seed=opts.seed, classes=classes)
        print(f"{report.n_tiles} tiles {report.tiles} -> {Path(args.out).resolve()} (train with target: multiclass)")
        return 0
    if args.source not in SLIDE_SOURCES:
        if args.tiling:
            raise ValueError(f"{args.source} is a patch dataset, converted without tiling; the options "
                             f"{' '.join(args.tiling)} apply to slide datasets ({', '.join(sorted(SLIDE_SOURCES))})")
        report = convert_source(args.source, args.root, args.out, progress=True)
        print(f"{report.n_tiles} tiles {report.tiles} -> {Path(args.out).resolve()}")
        return 0
    source = SLIDE_SOURCES[args.source]
    out = Path(args.out)
    prepared = out / "_prepared"  # "_": Parquet readers of <out> skip it, as they skip _manifest.json
    tiler = argparse.ArgumentParser(prog=f"histoweak import {args.source}",
                                    usage=f"%(prog)s ROOT OUT [histoweak tile options]")
    add_tiling_arguments(tiler)
    tiler.set_defaults(tissue_source=source.tissue_source)
    tile_args = tiler.parse_args([str(prepared / "slides.csv"), str(out), "--source", args.source, *args.tiling])
    manifest = prepared / "source.json"
    previous = json.loads(manifest.read_text()) if manifest.is_file() else {}
    recorded = Path(previous.get("root", "/nonexistent"))  # the dataset folder: ROOT, or the archive's folder in it
    if previous.get("source") == args.source and Path(args.root).resolve() in (recorded, recorded.parent):
        print(f"using the dataset prepared earlier in {prepared.resolve()}")
    else:
        prepare_slide_source(args.source, args.root, prepared)
        counts = json.loads(manifest.read_text())["counts"]
        print(f"{counts['slides']} images ({counts['with_mask']} with masks; {counts['by_split']})"
              f" -> {prepared.resolve()}")
    print(f"tiling, as `histoweak tile {prepared / 'slides.csv'} {out} --source {args.source} "
          f"--tissue-source {tile_args.tissue_source}{''.join(' ' + a for a in args.tiling)}`")
    return run_tiling(tile_args)


def folder_import_parser(source: str) -> argparse.ArgumentParser:
    """The options of ``histoweak import folder|csv ROOT OUT [options]`` (``histoweak.data.sources.folder``)."""
    p = argparse.ArgumentParser(prog=f"histoweak import {source}", usage="%(prog)s ROOT OUT [options]",
                                description="images with one label each -> a tile table (target: multiclass)")
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="share of each class for val when the data gives no val split (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=0.15,
                   help="share of each class for test when the data gives no test split (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of that stratified split (default: %(default)s)")
    p.add_argument("--classes", default=None,
                   help="class names in index order, comma-separated (default: sorted); give ordinal grades in "
                        "their order, e.g. BN,WD,MD,PD, for kappa")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from histoweak._ray import configure_console

    configure_console(args.verbose)  # before Ray and MLflow are imported

    from histoweak._ray import init_ray, release_cpus, request_cpus
    from histoweak.train import TrainConfig, fit

    values = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if not isinstance(values, dict):
        raise ValueError(f"{args.config}: must be a mapping of TrainConfig fields")
    values["method"] = args.method or values.get("method", "erm")
    from histoweak.methods import METHODS

    whole_slide = values["method"] in METHODS and METHODS[values["method"]].table == "slides"
    if whole_slide:  # one label per slide, and the embedded slide table by default
        values.setdefault("target", "label")
    if args.smoke_test:
        values.update(epochs=1, steps_per_epoch=2, batch_size=2 if whole_slide else 8)
    cfg = TrainConfig.from_dict(values)  # fails on a bad key before any work
    data = args.data or ("synthetic:camelyon" if whole_slide else None)
    table, n_classes = resolve_data(data, args.smoke_test, args.address)
    init_ray(args.address)
    request_cpus(args.cpus)
    try:
        out = fit(cfg, table, n_classes)
    finally:
        if args.cpus:
            release_cpus()
    print(f"best {cfg.method} checkpoint: {out.checkpoint}")
    for k, v in {**out.best, **out.test}.items():
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
    for k, v in out.data_state.items():  # what the method computed from the data (GERNE's beta_max)
        if isinstance(v, (int, float, str)):
            print(f"  data.{k}: {v}")
    return 0


def space_from_args(args: argparse.Namespace):
    """The search space a tune command runs: the YAML, then ``--smoke-test``'s overrides, ``--set``, ``--seeds``."""
    from histoweak.tune import load_search_space

    space = load_search_space(args.search_space)
    if args.smoke_test:
        space = space.with_overrides(space.smoke)
    if args.overrides:
        space = space.with_overrides(parse_overrides(args.overrides))
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError(f"--seeds {args.seeds}: must be >= 1")
        space = space.with_params({"train.seed": {"grid": list(range(args.seeds))}})
    return space


def cmd_tune(args: argparse.Namespace) -> int:
    from histoweak._ray import configure_console

    configure_console(args.verbose)  # before Ray and MLflow are imported
    from histoweak import tracking
    from histoweak._ray import init_ray
    from histoweak.methods import METHODS
    from histoweak.report import format_leaderboard
    from histoweak._ray import release_cpus, request_cpus
    from histoweak.tune import run_sweep

    space = space_from_args(args)  # fails on a bad key before any work
    data = args.data or space.data
    table, n_classes = resolve_data(data, args.smoke_test, args.address)
    knobs = parse_data_spec(data)[1] if data and data.startswith("synthetic:") else {}
    init_ray(args.address)
    request_cpus(args.cpus)
    try:
        rows = run_sweep(space, table, n_classes, storage=args.storage, progress=not args.no_progress,
                         stage2=getattr(args, "stage2", False), restart=args.restart, verbose=args.verbose,
                         data_params={f"data.{k}": v for k, v in knobs.items()})
    finally:
        if args.cpus:
            release_cpus()
    print(f"\nsweep {space.name}: {len(rows)} trials with results, best first by best_{space.metric}")
    if rows:
        print(format_leaderboard(rows, f"best_{space.metric}", [f"swept.{k}" for k in space.params],
                                 METHODS[space.method].headline_metrics))
        if rows[0].get("best_checkpoint"):
            print(f"best checkpoint: {rows[0]['best_checkpoint']}")
    uri = tracking.tracking_uri()
    print(f"full table: histoweak report --experiment {space.name}")
    print(f"MLflow: {uri} (experiment {space.name!r})")
    if uri.startswith("sqlite:///"):
        print(f"  browse it: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    print(f"  the sweep and its trials: {tracking.runs_page_url(space.name, uri)}")
    return 0


def _print_rows(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (no finished trials)")
        return
    keys = [k for k in rows[0] if k not in ("mlflow_run_id", "best_checkpoint")]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {k: min(max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)), 40) for k in keys}
    print("  " + "  ".join(k[:40].ljust(widths[k]) for k in keys))
    for r in rows:
        print("  " + "  ".join(fmt(r.get(k, ""))[:40].ljust(widths[k]) for k in keys))


def cmd_report(args: argparse.Namespace) -> int:
    from histoweak import figures, tracking

    if args.table1:
        return _report_table1(args.experiment or ["gerne", "gerne-erm"])
    if args.fig5:
        return _report_fig5(args.experiment[-1] if args.experiment else "segcls", args.out)
    if args.usegmix:
        return _report_usegmix(args.experiment or ["usegmix"])
    if args.magnet:
        return _report_magnet(args.experiment or ["magnet"])
    if args.heatmap:
        return _report_heatmap(args.experiment or [None], args.knob, args.baseline, args.metric, args.axes, args.out)
    parent, children = tracking.latest_sweep(args.experiment[-1] if args.experiment else None)
    metric = parent.data.params.get("metric", "val_bca")
    key = f"best_{metric}"
    mode = parent.data.params.get("mode", "max")
    rows = []
    for c in children:
        swept = {k: _num(v) for k, v in c.data.params.items() if k.startswith("swept.")}
        rows.append({"trial": c.info.run_name, "status": c.info.status, **swept,
                     key: c.data.metrics.get(key, float("nan")),
                     **{k: v for k, v in c.data.metrics.items() if k.startswith("test_")}})
    rows.sort(key=lambda r: (r[key] == r[key], r[key] if mode == "max" else -r[key]), reverse=True)
    exp = parent.data.tags.get("sweep", "?")
    _print_rows(rows, f"sweep {exp!r}, run {parent.info.run_name} ({parent.info.run_id}): best first by {key}")
    out = Path(args.out or f"report-{exp}.png")
    fig = figures.metric_vs_params_figure(rows, key, sorted({k for r in rows for k in r if k.startswith("swept.")}))
    fig.savefig(out, dpi=110)
    print(f"\n{key} vs the swept parameters: {out.resolve()}")
    return 0


def _finished_runs(experiments: list[str], keep=lambda c: c.info.status == "FINISHED") -> tuple[list[dict], object]:
    """The trials ``keep`` accepts (default: the finished ones) of the newest sweep of each experiment (one that has
    none is skipped with a line), as ``{"params", "metrics", "status"}`` with the sweep's ``data.*`` parameters (the
    knobs of its synthetic data) merged into each trial's, and the first sweep's MLflow run (None without any)."""
    from histoweak import tracking

    runs, parent = [], None
    for exp in experiments:
        try:
            p, children = tracking.latest_sweep(exp)
        except ValueError as exc:
            print(f"histoweak report: skipping {exp!r}: {exc}", file=sys.stderr)
            continue
        parent = parent or p
        data = {k: v for k, v in p.data.params.items() if k.startswith("data.")}
        runs += [{"params": {**data, **c.data.params}, "metrics": c.data.metrics, "status": c.info.status}
                 for c in children if keep(c)]
    return runs, parent


def _print_and_log_table(table: str, parent, name: str) -> None:
    """Print a paper-layout table and log it as ``name`` on the sweep's MLflow run."""
    import tempfile

    from histoweak import tracking

    print(table)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(table + "\n")
        tracking.log_artifact(parent.info.run_id, path)


def _report_table1(experiments: list[str]) -> int:
    """GERNE's Table 1 from the newest sweep of each experiment (ERM and GERNE runs with a group threshold)."""
    from histoweak.report import format_table1, table1_cells

    runs, _ = _finished_runs(experiments)
    cells, taus = table1_cells(runs)
    if not taus:
        raise ValueError(f"no finished ERM/GERNE runs with a group threshold in {experiments}")
    print(format_table1(cells, taus, title=f"Table 1 layout from the newest sweeps of {', '.join(experiments)}"))
    return 0


def _report_heatmap(experiments: list[str | None], knob: str | None, baseline: str, metrics: list[str] | None,
                    axes: list[str] | None, out: str | None) -> int:
    """Sensitivity heatmaps (issue 15): the gain of each value of ``knob`` over ``baseline`` per combination of
    ``axes`` values, paired by seed, from the newest sweep of each experiment (its trials that finished or
    failed with a result, its ``data.*`` parameters merged in); one table and figure per metric, printed, saved
    under ``out`` and logged to the first sweep's MLflow run, plus the CAM histograms per knob value if logged."""
    import matplotlib.pyplot as plt

    from histoweak import figures, tracking
    from histoweak.methods import METHODS
    from histoweak.report import cam_hist_classes, cam_histograms, format_heatmap, heatmap_cells, param

    if not knob:
        raise ValueError("--heatmap needs --knob, e.g. --knob hparams.beta")
    runs, parent = _finished_runs(experiments, lambda c: c.info.status in ("FINISHED", "FAILED") and any(
        k == "diverged" or k.startswith("test_") for k in c.data.metrics))
    if not runs:
        raise ValueError(f"no finished or failed runs with results in the newest sweeps of {experiments}")
    if not metrics:
        defaults = {next((m for m in METHODS[name].headline_metrics if m.startswith("test_")), None)
                    for name in {param(r, "train.method") for r in runs} if name in METHODS}
        if len(defaults) != 1 or None in defaults:
            raise ValueError(f"give --metric: the runs' methods have no single test headline metric ({defaults})")
        metrics = list(defaults)
    if axes is None:
        keys = {k.removeprefix("swept.") for r in runs for k in r["params"] if k.startswith("swept.")}
        keys |= {k for r in runs for k in r["params"] if k.startswith("data.")}
        axes = sorted(k for k in keys - {knob, "train.seed"} if len({str(param(r, k)) for r in runs}) > 1)
    out_dir = Path(out or "report-heatmap")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(e or "the newest experiment" for e in experiments)
    for metric in metrics:
        cells = heatmap_cells(runs, knob, baseline, metric, axes)
        title = f"{metric}: gain of {knob} over {knob}={baseline}, newest sweeps of {names}"
        _print_and_log_table(format_heatmap(cells, knob, axes, metric, title=title), parent, f"heatmap_{metric}.txt")
        fig = figures.heatmap_figure(cells, knob, axes, metric, title)
        fig.savefig(out_dir / f"heatmap_{metric}.png", dpi=110)
        tracking.log_figure(parent.info.run_id, fig, f"heatmap_{metric}.png")
        plt.close(fig)
    classes = cam_hist_classes(runs)
    if classes:
        fig = figures.cam_histograms_figure(cam_histograms(runs, knob, classes), classes,
                                            f"test: CAM values at each class's pixels per {knob}",
                                            knob.rsplit(".", 1)[-1])
        fig.savefig(out_dir / "cam_histograms.png", dpi=110)
        tracking.log_figure(parent.info.run_id, fig, "cam_histograms.png")
        plt.close(fig)
    print(f"figures: {out_dir.resolve()}; logged to the sweep's MLflow run {parent.info.run_id}")
    return 0


def _report_usegmix(experiments: list[str]) -> int:
    """USegMix's Table 1 (Acc, F1, Kappa, Avg↑ vs no synthesis per backbone) from the newest sweep of each
    experiment (e.g. ``usegmix`` and a CutMix baseline sweep), logged to the first one's MLflow run."""
    from histoweak.report import format_usegmix_table, usegmix_cells

    runs, parent = _finished_runs(experiments)
    cells = usegmix_cells(runs)
    if not cells:
        raise ValueError(f"no finished runs with test_acc, test_f1_macro and test_kappa in {experiments}")
    _print_and_log_table(format_usegmix_table(cells, title=f"Table 1 layout from the newest sweeps of "
                                                           f"{', '.join(experiments)}"), parent, "table1_usegmix.txt")
    return 0


def _report_magnet(experiments: list[str]) -> int:
    """MagNets' Table 1 (AUROC per metastasis size class, pixels read against tiling) from the newest sweep of
    each experiment (e.g. ``magnet`` and a baselines sweep), logged to the first one's MLflow run."""
    from histoweak.report import format_magnet_table, magnet_cells

    runs, parent = _finished_runs(experiments)
    cells = magnet_cells(runs)
    if not cells:
        raise ValueError(f"no finished whole-slide runs (magnet, mean_rgb, attention_mil) with test_auroc in "
                         f"{experiments}")
    _print_and_log_table(format_magnet_table(cells, title=f"Table 1 layout from the newest sweeps of "
                                                          f"{', '.join(experiments)} (test AUROC %, mean ± std over "
                                                          "runs of a row)"), parent, "table1_magnet.txt")
    return 0


def _report_fig5(experiment: str, out: str | None) -> int:
    """Ciga & Martel's Fig. 5 and Table D.5 from the newest sweep of ``experiment``, logged to that sweep's run."""
    import matplotlib.pyplot as plt

    from histoweak import figures, tracking
    from histoweak.report import FIG5_METRICS, fig5_cells, fig5_relative, format_table_d5

    parent, children = tracking.latest_sweep(experiment)
    runs = [{"params": c.data.params, "metrics": c.data.metrics} for c in children if c.info.status == "FINISHED"]
    cells = fig5_cells(runs)
    if not cells:
        raise ValueError(f"no finished segcls runs in the newest sweep of {experiment!r}")
    table = format_table_d5(cells, title=f"Table D.5 layout, sweep {parent.info.run_name} ({experiment})")
    print(table)
    try:
        plotted, relative = fig5_relative(cells), True
    except ValueError as exc:
        print(f"histoweak report: {exc}; Fig. 5 shows raw values")
        plotted, relative = cells, False
    fig = figures.fig5_figure(plotted, FIG5_METRICS, relative, f"Fig. 5 layout: {experiment}, test split")
    path = Path(out or f"fig5-{experiment}.png")
    fig.savefig(path, dpi=110)
    run_id, uri = parent.info.run_id, tracking.tracking_uri()
    tracking.log_figure(run_id, fig, "fig5.png", uri)
    plt.close(fig)
    tracking.log_table(run_id, [{"setting": st, "s": s, "metric": k, "values": " ".join(f"{v:.4f}" for v in vals)}
                                for (st, s), c in sorted(cells.items()) for k, vals in c.items()], "table_d5.csv", uri)
    print(f"figure: {path.resolve()}; logged to the sweep's MLflow run {run_id} (fig5.png, table_d5.csv)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    """Tiles per group and split at ``--tau``; with ``--checkpoint``, GERNE's Fig. 1 for that model on test."""
    if args.checkpoint:  # refuse a bad or unsafe checkpoint before any data, Ray or MLflow work
        from histoweak.checkpoint import load_checkpoint

        load_checkpoint(args.checkpoint)
    import matplotlib.pyplot as plt

    from histoweak import figures, tracking
    from histoweak.methods.base import GROUP_NAMES
    from histoweak.report import group_counts

    table, n_classes = resolve_data(args.data, address=args.address)
    counts = group_counts(table, args.target, n_classes, args.tau)
    _print_rows([{"split": sp, **{GROUP_NAMES[g]: n for g, n in c.items()}} for sp, c in counts.items()],
                f"tiles per group at tau = {args.tau:g} ({table})")
    uri = tracking.tracking_uri()
    run_id = tracking.parent_run("shortcut-analysis", f"tau{args.tau:g}-{Path(table).parent.name}",
                                 {"tau": args.tau, "target": args.target, "checkpoint": args.checkpoint or "-"},
                                 {"dataset": table, "dataset_hash": tracking.dataset_hash(table)}, uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = figures.group_counts_figure(counts, GROUP_NAMES, f"tiles per group, tau = {args.tau:g}")
    fig.savefig(out / "group_counts.png", dpi=110)
    tracking.log_figure(run_id, fig, "group_counts.png", uri)
    plt.close(fig)
    if args.checkpoint:
        import ray.train

        from histoweak._ray import init_ray
        from histoweak.report import metrics_at_tau
        from histoweak.train import score_checkpoint

        init_ray(args.address)
        _, pred = score_checkpoint(ray.train.Checkpoint.from_directory(args.checkpoint), table, n_classes, "test")
        m = metrics_at_tau(pred, args.tau, "test")
        tracking.log_metrics(run_id, m, uri=uri)
        fig = figures.shortcut_figure(pred, int(args.target.split(":")[1]), args.tau,
                                      title=f"test split: WGA {m['test_wga']:.3f}, BCA {m['test_bca']:.3f}")
        fig.savefig(out / "shortcut_analysis.png", dpi=110)
        tracking.log_figure(run_id, fig, "shortcut_analysis.png", uri)
        plt.close(fig)
        print(f"test WGA {m['test_wga']:.4f}, BCA {m['test_bca']:.4f}")
    tracking.end_run(run_id, "FINISHED", uri)
    print(f"figures: {out.resolve()}; MLflow: {uri} (experiment 'shortcut-analysis')")
    return 0


def _num(v: str):
    try:
        return float(v) if any(c in v for c in ".eE") else int(v)
    except ValueError:
        return v


def cmd_predict(args: argparse.Namespace) -> int:
    """Segment whole slides with a segmentation checkpoint; exit 1 when any slide failed."""
    from histoweak._ray import configure_console

    configure_console()  # before Ray and MLflow are imported
    from histoweak import tracking
    from histoweak.predict import EXPERIMENT, predict_slides

    report = predict_slides(args.checkpoint, args.slides, args.out, masks_dir=args.masks, tile_size=args.tile_size,
                            stride=args.stride, level=args.level, mpp=args.mpp, magnification=args.magnification,
                            assume_mpp=args.assume_mpp, batch_size=args.batch_size, address=args.address)
    for line in report.result_lines():
        print(line)
    print(f"MLflow: {tracking.tracking_uri()} (experiment {EXPERIMENT!r}, run {report.run_id})")
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return 1 if report.failures else 0


def build_parser() -> argparse.ArgumentParser:
    from histoweak.data.sources import SOURCES
    from histoweak.data.synthetic import PRESETS

    parser = argparse.ArgumentParser(prog="histoweak", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic H&E-like slides with pixel ground truth")
    p.add_argument("out", help="output directory (slides, masks, classes.json, slides.csv)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="dataset recipe (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same slides (default: 0)")
    p.add_argument("--n-slides", type=int, help="number of slides (default: the preset's)")
    p.add_argument("--size", type=int, help="level-0 side in pixels (default: the preset's)")
    p.add_argument("--shortcut", type=float,
                   help="strength of the tissue-amount/tumour correlation, 0-1 (default: the preset's)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("tile", help="tile slides (and masks) into a Parquet tile table with Ray")
    add_tiling_arguments(p)
    p.set_defaults(func=run_tiling)

    from histoweak.data.sources._slides import SLIDE_SOURCES
    from histoweak.data.sources.folder import FOLDER_SOURCES

    p = sub.add_parser("import", help="turn a public dataset into a tile table: patch datasets (LUAD-HistoSeg, "
                                      "BCSS-WSSS) directly, slide datasets (BACH, Gleason2019, DigestPath2019) "
                                      "prepared into <out>/_prepared/ (slides.csv, masks) then tiled, and any "
                                      "dataset of labelled images from class folders (folder) or a CSV (csv)")
    p.add_argument("source", choices=sorted([*SOURCES, *SLIDE_SOURCES, *FOLDER_SOURCES]),
                   help="which dataset layout to read")
    p.add_argument("root", help="the dataset's folder, in the layout its adapter documents (patch datasets: "
                                "train/ or training/, val/, test/; folder: <class>/<image>, optionally under "
                                "train/ val/ test/); csv: the CSV file (path,label[,split], paths relative to it)")
    p.add_argument("out", help="the tile table to write (must not exist or be empty)")
    p.add_argument("tiling", nargs=argparse.REMAINDER, metavar="OPTIONS",
                   help="slide datasets: any `histoweak tile` option, e.g. --tile-size 256 --level 0 "
                        "(see histoweak tile -h); --tissue-source defaults to the dataset's (detector). "
                        "folder and csv: --val-fraction F --test-fraction F --seed N (a stratified split when "
                        "the data gives none; default 0.15, 0.15, 0) and --classes A,B,C (class order; default "
                        "sorted)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("slides", help="write a slide table (one row per slide, nothing tiled) for whole-slide "
                                      "methods (magnet, attention_mil, mean_rgb): from a CSV or Camelyon16/17")
    p.add_argument("source", choices=["csv", "camelyon"], help="csv: --csv FILE (slide_id,path,label,split"
                                                               "[,size_class,center]); camelyon: --c16/--c17 roots")
    p.add_argument("out", help="the slide table to write (a directory)")
    p.add_argument("--csv", help="the CSV (paths relative to it)")
    p.add_argument("--c16", help="Camelyon16's folder (training/normal, training/tumor, testing/images, ...)")
    p.add_argument("--c17", help="Camelyon17's folder (training/center_K, training/stage_labels.csv, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Camelyon split (default %(default)s)")
    p.set_defaults(func=cmd_slides)

    p = sub.add_parser("train", help="train one method with Ray Train")
    # No choices=: the registry fills in when histoweak.methods (torch, timm) is imported, too slow for every
    # command's parser; an unknown name fails before any work with the valid names.
    p.add_argument("--method", default=None,
                   help="registered method name; an unknown one fails listing them (default: the config's, else erm)")
    p.add_argument("--data", default=None,
                   help="tile table, or synthetic:<preset> (default: the embedded synthetic dataset)")
    p.add_argument("--config", default=None, help="YAML of TrainConfig fields (epochs, batch_size, hparams, ...)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_cpus_argument(p)
    p.add_argument("--smoke-test", action="store_true",
                   help="one epoch of two batches of 8 (on small data when synthetic)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs (Ray Data, Ray Train)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="run a Ray Tune sweep from a search-space YAML, recorded in MLflow")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("report", help="print a sweep's leaderboard and plot its metric vs the swept parameters")
    p.add_argument("--experiment", action="append", default=None,
                   help="MLflow experiment (= sweep name; default: the newest); repeatable with --table1")
    p.add_argument("--out", default=None,
                   help="PNG path (default: report-<experiment>.png); with --heatmap a directory")
    p.add_argument("--table1", action="store_true",
                   help="GERNE's Table 1 (WGA/BCA per tau, mean ± std over seeds) from the gerne and gerne-erm sweeps")
    p.add_argument("--fig5", action="store_true",
                   help="Ciga & Martel's Fig. 5 and Table D.5 (segcls: F1/mIoU vs s per setting) from the newest "
                        "sweep of --experiment (default segcls), logged to its MLflow run")
    p.add_argument("--magnet", action="store_true",
                   help="MagNets' Table 1 (AUROC per metastasis size class, pixels read against tiling) from the "
                        "newest sweep of each --experiment (default magnet)")
    p.add_argument("--usegmix", action="store_true",
                   help="USegMix's Table 1 (Acc, F1, Kappa, Avg↑ vs no synthesis per backbone, mean ± std over "
                        "seeds) from the newest sweep of each --experiment (default usegmix)")
    p.add_argument("--heatmap", action="store_true",
                   help="sensitivity heatmaps: the gain of each --knob value over --baseline per combination of "
                        "--axes values, mean ± std over paired seeds, from the newest sweep of each --experiment; "
                        "--out is then a directory (default report-heatmap/)")
    p.add_argument("--knob", default=None, help="with --heatmap: the parameter whose values form the rows, "
                                                "e.g. hparams.beta or hparams.lam")
    p.add_argument("--baseline", default="0", help="with --heatmap: the knob value gains are measured against "
                                                   "(default: %(default)s)")
    p.add_argument("--metric", action="append", default=None,
                   help="with --heatmap: a test metric, e.g. test_wga; repeatable, one heatmap each (default: the "
                        "method's first test headline metric)")
    p.add_argument("--axes", nargs="+", default=None, metavar="KEY",
                   help="with --heatmap: the parameters whose values form the columns, e.g. hparams.lr data.shortcut "
                        "(default: every swept parameter but the knob and the seed, and every data.* parameter, "
                        "that takes more than one value)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("predict", help="segment whole slides with a segmentation checkpoint: class masks, overlays, "
                                       "GeoJSON, and metrics against ground truth, recorded in MLflow")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_DIR",
                   help="a checkpoint directory (state.pt + config.json) of a segmentation method, or the MLflow run "
                        "id of a trial (its best_checkpoint tag)")
    p.add_argument("slides", help="directory, glob pattern, or CSV (slide_id,path[,mask_path,...]) of the slides")
    p.add_argument("out", help="output directory: <slide_id>_mask.tiff, <slide_id>_overlay.png, <slide_id>.geojson")
    p.add_argument("--masks", default=None,
                   help="directory of ground-truth class-index masks named <slide stem>.tiff or .png (a CSV's "
                        "mask_path column also counts): per-slide pixel F1 and mIoU")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile side in pixels of the level (default: the checkpoint's tiling, else 224)")
    p.add_argument("--stride", type=int, default=None,
                   help="step between tiles, at most the tile size (default: a quarter tile of overlap)")
    p.add_argument("--level", type=int, default=None,
                   help="pyramid level to predict at; the masks are at this level (default: the checkpoint's tiling, else 0)")
    p.add_argument("--mpp", type=float, default=None,
                   help="predict at this many microns per pixel instead, each slide read from its coarsest level at "
                        "least this fine (default: the checkpoint's tiling)")
    p.add_argument("--magnification", type=float, default=None, help="as --mpp, as an objective magnification (10 / mpp)")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="microns per level-0 pixel for slides whose file does not say")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per model call (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("analyze", help="tiles per group (y, tissue >= tau) per split; GERNE's Fig. 1 for a checkpoint")
    p.add_argument("--data", default="synthetic:gerne", help="tile table or synthetic:<preset> (default: %(default)s)")
    p.add_argument("--tau", type=float, default=0.1,
                   help="tissue-ratio threshold that splits each class into groups (default: %(default)s)")
    p.add_argument("--target", default="class:1",
                   help="binary target class:<c>, is class c in the tile (default: %(default)s)")
    p.add_argument("--checkpoint", default=None,
                   help="a training checkpoint directory (from a sweep's trials); refused unless it holds only "
                        "tensors and plain values")
    p.add_argument("--out", default="analysis", help="directory for the PNGs (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("local-cluster", help="the autoscaling drill: a Ray head on 127.0.0.1 whose autoscaler starts and "
                                             "removes local worker nodes of cluster.yaml's types")
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--config", default="cluster.yaml", help="cluster-launcher config (default: %(default)s)")
    p.add_argument("--temp-dir", default=".cache/local-cluster", help="the nodes' files and logs (default: %(default)s)")
    p.add_argument("--port", type=int, default=6390, help="GCS port (default: %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=8275, help="dashboard and job server (default: %(default)s)")
    p.add_argument("--head-cpus", type=int, default=1, help="CPUs of the head (default: %(default)s)")
    p.add_argument("--cpus-per-node", type=int, default=2, help="CPUs of each worker node (default: %(default)s)")
    p.add_argument("--idle-timeout-minutes", type=float, default=0.5,
                   help="remove a worker node idle this long (default: %(default)s; cluster.yaml's is for AWS)")
    p.set_defaults(func=cmd_local_cluster)
    return parser


def cmd_local_cluster(args: argparse.Namespace) -> int:
    from histoweak.local_cluster import start_local_cluster, stop_local_cluster

    if args.action == "down":
        print(f"stopped {stop_local_cluster(args.temp_dir)} processes of the local cluster in {args.temp_dir}")
        return 0
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"{args.config}: no such cluster config")
    address = start_local_cluster(args.config, args.temp_dir, args.port, args.dashboard_port, args.head_cpus,
                                  args.cpus_per_node, args.idle_timeout_minutes)
    print(f"Ray head on 127.0.0.1:{args.port} with the autoscaler for {args.config}'s node types (fake provider)")
    print(f"  jobs: ray job submit --address {address} --working-dir . -- python jobs/tune_erm.py --smoke-test --cpus 4")
    print(f"  watch: ray status --address 127.0.0.1:{args.port}")
    print("  stop: histoweak local-cluster down")
    return 0


#: what a user's input can raise (a bad value, a missing or unreadable file): one ``error:`` line, exit 2
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run_command(func, args: argparse.Namespace, prog: str) -> int:
    """``func(args)``, with a user's error reported as one line naming the problem and exit code 2."""
    try:
        return func(args)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, f"histoweak {args.command}")


if __name__ == "__main__":
    sys.exit(main())
