"""Sensitivity maps (issue 15): where does a method's knob help? One sweep per value of a synthetic dataset's knob,
then ``histoweak report --heatmap`` over all of them.

``jobs/sensitivity_gerne.py`` (GERNE's beta x lr x the ``gerne`` preset's ``shortcut``) and
``jobs/sensitivity_pscl.py`` (PSCL's lambda x training length x the ``wsss`` preset's ``partial``) call
``run_sensitivity``. Each sweep is an ordinary ``histoweak tune`` run (its own MLflow experiment,
``<space name>-<knob><value>-seed<s>``, resumable on its own), on ``synthetic:<preset>?<knob>=<value>``, one seed
each: the seeds (``--seeds N``, else the search space's ``train.seed`` grid) run outermost, so a map interrupted
after its first seed is whole for that seed, and the report reads whatever sweeps exist. The sweep's MLflow run
records the knob as ``data.<knob>``, which the heatmap reads as one of its axes.
"""

from __future__ import annotations

import argparse
import copy

__all__ = ["add_sensitivity_arguments", "run_sensitivity", "sweep_names"]


def add_sensitivity_arguments(p: argparse.ArgumentParser, default_space: str, data_knob: str,
                              values: list[float]) -> None:
    """``histoweak tune``'s arguments plus the data knob's values."""
    from histoweak.cli import add_tune_arguments

    add_tune_arguments(p, default_space=default_space)
    p.add_argument(f"--{data_knob}", type=float, nargs="+", default=values, dest="knob_values",
                   help=f"the synthetic preset's `{data_knob}` values, one sweep each (default: %(default)s)")
    p.add_argument("--report-only", action="store_true",
                   help="only draw the heatmaps from the sweeps already in MLflow")
    p.set_defaults(data_knob=data_knob)


def _cells(seeds: list[int], values: list[float]) -> list[tuple[int, float]]:
    """(seed, knob value) of each sweep, seed by seed: the maps fill in one whole seed at a time."""
    return [(seed, v) for seed in seeds for v in values]


def sweep_names(space_name: str, data_knob: str, values: list[float], seeds: list[int]) -> list[str]:
    """The sweeps' (MLflow experiments') names, one per seed and knob value, in the order they run."""
    return [f"{space_name}-{data_knob}{v:g}-seed{seed}" for seed, v in _cells(seeds, values)]


def run_sensitivity(args: argparse.Namespace, knob: str, metrics: list[str], baseline: float = 0.0) -> int:
    """Run (or resume) one sweep per ``args.knob_values`` of ``args.data_knob``, then the heatmap of each of
    ``metrics``' gain over ``knob`` = ``baseline`` across them (printed, and logged on the first sweep's run).
    Returns the first non-zero exit code, else the report's."""
    from histoweak.cli import cmd_report, cmd_tune, space_from_args

    space = space_from_args(args)  # a malformed search space or --set fails here, before any sweep
    data = args.data or space.data
    if not (data or "").startswith("synthetic:"):
        raise ValueError(f"--data {data}: a sensitivity map sweeps a synthetic preset's `{args.data_knob}` knob; "
                         "give synthetic:<preset>")
    seed_grid = space.params.get("train.seed", {}).get("grid")
    seeds = list(range(args.seeds)) if args.seeds else seed_grid or [space.train.get("seed", 0)]
    names = sweep_names(space.name, args.data_knob, args.knob_values, seeds)
    if not args.report_only:
        for (seed, value), name in zip(_cells(seeds, args.knob_values), names):
            one = copy.copy(args)
            one.data = f"{data}{'&' if '?' in data else '?'}{args.data_knob}={value:g}"
            one.overrides, one.seeds = [*args.overrides, f"name={name}", f"train.seed={seed}"], None
            print(f"\n== {name}: {one.data}, seed {seed}")
            code = cmd_tune(one)
            if code:
                return code
    report = argparse.Namespace(heatmap=True, experiment=names, knob=knob, baseline=baseline, metric=list(metrics),
                                axes=None, out=f"report-{space.name}", table1=False, fig5=False, usegmix=False,
                                magnet=False)
    return cmd_report(report)
