import collections
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoweak import figures
from histoweak.data.defaults import n_classes_of
from histoweak.report import cam_hist_classes, cam_histograms, format_heatmap, group_counts, heatmap_cells, param


@pytest.mark.parametrize("target", ["class:1", "class:2"])
def test_group_counts_streamed_match_rows(tile_table, target):
    files = sorted(tile_table.rglob("*.parquet"))
    assert len(files) > 1  # the counts add up over several files' batches
    c = int(target.split(":")[1])
    rows = pq.read_table(tile_table, columns=["split", "labels", "tissue_ratio"]).to_pylist()
    for tau in (0.03, 0.5, 0.9):
        # GERNE's groups by hand: 2 * y + [tissue_ratio >= tau], y = class c present
        expected = collections.defaultdict(lambda: dict.fromkeys(range(4), 0))
        for r in rows:
            expected[r["split"]][2 * (r["labels"][c] > 0) + (r["tissue_ratio"] >= tau)] += 1
        got = group_counts(str(tile_table), target, n_classes_of(tile_table), tau)
        assert got == dict(expected)
        assert sum(n for s in got.values() for n in s.values()) == len(rows)


# --- sensitivity heatmaps (issue 15) ---------------------------------------------------------------------------

# test_wga by (beta, lr, seed); None = the run diverged with no test metric; a missing key = no run
WGA = {(0.0, 1e-4, 0): 0.70, (0.0, 1e-4, 1): 0.74,  # seed 2 missing
       (0.0, 1e-3, 0): 0.60, (0.0, 1e-3, 1): 0.62, (0.0, 1e-3, 2): 0.64,
       (0.5, 1e-4, 0): 0.73, (0.5, 1e-4, 1): 0.75, (0.5, 1e-4, 2): 0.80,
       (0.5, 1e-3, 0): 0.65, (0.5, 1e-3, 1): None, (0.5, 1e-3, 2): 0.60,
       (0.5, 1e-2, 0): 0.50}  # a column without a baseline
DIVERGED = {(0.5, 1e-3, 1), (0.0, 1e-3, 2)}  # the second kept a test metric from before the divergence


def _hrun(beta, lr, seed, wga, diverged=False):
    """A sweep child as MLflow returns it: strings, swept values twice, train fields at the top level."""
    lr_text = {1e-4: "0.0001", 1e-3: "1e-3", 1e-2: "0.01"}[lr]  # either spelling parses to the same number
    params = {"method": "gerne", "seed": str(seed), "swept.train.seed": str(seed), "epochs": "3",
              "hparams.beta": str(beta), "swept.hparams.beta": str(beta), "hparams.lr": lr_text,
              "swept.hparams.lr": lr_text, "data.shortcut": "0.2"}
    metrics = {} if wga is None else {"test_wga": wga}
    if diverged:
        metrics["diverged"] = 1.0
    return {"params": params, "metrics": metrics, "status": "FAILED" if diverged else "FINISHED"}


def _heatmap_runs():
    return [_hrun(b, lr, s, w, (b, lr, s) in DIVERGED) for (b, lr, s), w in WGA.items()]


def _split(line: str) -> list[str]:
    return re.split(r" {2,}", line.strip())


def test_param_lookup_prefers_swept_then_the_key_then_train_fields():
    run = _hrun(0.5, 1e-4, 2, 0.7)
    run["params"]["hparams.beta"] = "9"  # the swept value wins
    assert param(run, "hparams.beta") == 0.5 and param(run, "hparams.lr") == 1e-4
    assert param(run, "train.seed") == 2.0 and param(run, "train.epochs") == 3.0  # top level for train.*
    assert param(run, "data.shortcut") == 0.2 and param(run, "train.method") == "gerne"
    assert param(run, "hparams.missing") is None


def test_heatmap_gains_are_paired_by_seed():
    cells = heatmap_cells(_heatmap_runs(), "hparams.beta", "0", "test_wga", ["hparams.lr"])
    assert set(cells) == {(b, lr) for b in (0.0, 0.5) for lr in (1e-4, 1e-3, 1e-2)}  # the full grid
    # lr 1e-4: baseline seed 2 missing -> seeds 0, 1 paired
    c = cells[(0.5, 1e-4)]
    g = [0.73 - 0.70, 0.75 - 0.74]
    assert c["n"] == 2 and c["gains"] == pytest.approx({0.0: g[0], 1.0: g[1]})
    assert c["mean"] == pytest.approx(np.mean(g)) and c["std"] == pytest.approx(np.std(g, ddof=1))
    assert (c["runs"], c["diverged"]) == (3, 0)
    assert c["value"] == pytest.approx(np.mean([0.73, 0.75, 0.80])) and c["base"] == pytest.approx(0.72)
    # lr 1e-3: seed 1 diverged without a metric -> seeds 0, 2; the baseline's diverged seed 2 kept its metric
    c = cells[(0.5, 1e-3)]
    g = [0.65 - 0.60, 0.60 - 0.64]
    assert c["n"] == 2 and c["mean"] == pytest.approx(np.mean(g)) and c["std"] == pytest.approx(np.std(g, ddof=1))
    assert (c["runs"], c["diverged"]) == (3, 1)
    assert c["value"] == pytest.approx(0.625) and c["base"] == pytest.approx(0.62)
    # the baseline rows: absolute values and divergences, no gains
    b = cells[(0.0, 1e-3)]
    assert b["baseline"] and (b["runs"], b["diverged"], b["n"]) == (3, 1, 0) and b["value"] == pytest.approx(0.62)
    assert np.isnan(b["mean"]) and not cells[(0.5, 1e-3)]["baseline"]
    # no baseline at lr 1e-2: no paired seed
    c = cells[(0.5, 1e-2)]
    assert (c["runs"], c["n"]) == (1, 0) and np.isnan(c["mean"]) and np.isnan(c["base"])
    assert cells[(0.0, 1e-2)]["runs"] == 0


def test_heatmap_std_is_nan_with_one_seed_and_seeds_average_within_a_cell():
    runs = [_hrun(0.0, 1e-4, 0, 0.5), _hrun(0.5, 1e-4, 0, 0.6), _hrun(0.5, 1e-4, 0, 0.8), _hrun(0.5, 1e-4, 1, 0.9)]
    (c,) = [c for k, c in heatmap_cells(runs, "hparams.beta", 0, "test_wga").items() if k == (0.5,)]
    assert c["n"] == 1 and c["mean"] == pytest.approx(np.mean([0.6, 0.8]) - 0.5) and np.isnan(c["std"])
    assert c["runs"] == 3


def test_heatmap_errors_name_the_problem():
    with pytest.raises(ValueError, match="no runs"):
        heatmap_cells([], "hparams.beta", 0, "test_wga")
    with pytest.raises(ValueError, match=r"no run has hparams.beta = 1; values: \[0.0, 0.5\]"):
        heatmap_cells(_heatmap_runs(), "hparams.beta", "1", "test_wga")
    with pytest.raises(ValueError, match="no run has hparams.gamma"):
        heatmap_cells(_heatmap_runs(), "hparams.gamma", 0, "test_wga")


def test_heatmap_table_shows_gains_in_points_and_divergences():
    cells = heatmap_cells(_heatmap_runs(), "hparams.beta", 0, "test_wga", ["hparams.lr"])
    lines = format_heatmap(cells, "hparams.beta", ["hparams.lr"], "test_wga", title="T").splitlines()
    print("\n".join(lines))
    assert lines[0] == "T"
    assert _split(lines[1]) == ["beta", "lr=1e-4", "lr=1e-3", "lr=0.01"]
    g1 = 100 * np.array([0.03, 0.01])
    g2 = 100 * np.array([0.05, -0.04])
    assert _split(lines[2]) == ["0 (base)", f"{100 * np.mean([0.70, 0.74]):.2f}", "62.00 (div 1/3)", "-"]
    assert _split(lines[3]) == ["0.5", f"+{g1.mean():.2f} ± {g1.std(ddof=1):.2f}",
                                f"+{g2.mean():.2f} ± {g2.std(ddof=1):.2f} (div 1/3)", "-"]
    assert lines[3].split()[1:4] == ["+2.00", "±", "1.41"]
    assert lines[-1].startswith("gain in test_wga over hparams.beta=0 (points), mean ± std over paired seeds")
    assert len(lines) == 5


def test_heatmap_figure_has_a_cell_per_gain_and_grey_where_unpaired():
    cells = heatmap_cells(_heatmap_runs(), "hparams.beta", 0, "test_wga", ["hparams.lr"])
    fig = figures.heatmap_figure(cells, "hparams.beta", ["hparams.lr"], "test_wga", "t")
    ax, colorbar = fig.axes
    image = ax.get_images()[0].get_array()
    gains = 100 * np.array([np.mean([0.03, 0.01]), np.mean([0.05, -0.04])])
    assert image.shape == (1, 3) and np.allclose(image[0, :2], gains) and image.mask[0, 2]
    assert ax.get_images()[0].get_clim() == pytest.approx((-gains.max(), gains.max()))  # symmetric about 0
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 3 and texts[1].endswith("\n(div 1/3)") and texts[2] == "-"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lr=1e-4", "lr=1e-3", "lr=0.01"]


def test_cam_histograms_average_over_runs_per_knob_value():
    rng = np.random.default_rng(0)

    def run(lam, hist):  # hist: (2 classes, 10 bins), rows "stroma", "tumor"
        m = {f"test_cam_hist_{name}_{b}": float(hist[c, b]) for c, name in enumerate(("stroma", "tumor"))
             for b in range(10)}
        return {"params": {"swept.hparams.lam": str(lam)}, "metrics": {**m, "test_miou": 0.5}}

    hists = {lam: [rng.dirichlet(np.ones(10), size=2) for _ in range(k)] for lam, k in ((0.0, 2), (0.1, 3))}
    runs = [run(lam, h) for lam, hs in hists.items() for h in hs] + [{"params": {}, "metrics": {"test_miou": 1}}]
    assert cam_hist_classes(runs) == ["stroma", "tumor"]
    got = cam_histograms(runs, "hparams.lam")
    assert list(got) == [0.0, 0.1]
    for lam, hs in hists.items():
        assert got[lam].shape == (2, 10) and np.allclose(got[lam], np.mean(hs, axis=0))
        assert np.allclose(got[lam].sum(1), 1)
    fig = figures.cam_histograms_figure(got, ["stroma", "tumor"], "t", knob="lam")
    assert len(fig.axes) == 2 and all(len(ax.patches) == 2 for ax in fig.axes)  # a step line per lam
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["lam=0", "lam=0.1"]


def test_report_heatmap_from_mlflow_sweeps(tmp_path, monkeypatch, capsys):
    """`histoweak report --heatmap` on two logged sweeps that differ in a data knob (the parents' ``data.shortcut``):
    the knob becomes a column, FINISHED and FAILED children count, a RUNNING one does not, and the table and
    figures land locally and on the first sweep's run."""
    from mlflow.tracking import MlflowClient

    from histoweak import tracking
    from histoweak.cli import build_parser, cmd_report

    store = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    wga = {("0.2", 0, 0): 0.70, ("0.2", 0, 1): 0.72, ("0.2", 1, 0): 0.75, ("0.2", 1, 1): 0.71,
           ("0.8", 0, 0): 0.50, ("0.8", 0, 1): 0.56, ("0.8", 1, 0): 0.62, ("0.8", 1, 1): None}  # diverged
    parents = {}
    for exp, shortcut in (("sens-a", "0.2"), ("sens-b", "0.8")):
        parents[exp] = tracking.parent_run(exp, "sweep", {"data.shortcut": shortcut, "metric": "val_wga"},
                                           {"sweep": exp})
        for beta in (0, 1):
            for seed in (0, 1):
                w = wga[(shortcut, beta, seed)]
                run = tracking.child_run(parents[exp], f"t{beta}{seed}", {
                    "method": "gerne", "seed": seed, "swept.train.seed": seed, "swept.hparams.beta": beta}, {})
                tracking.log_metrics(run, {"test_wga": w} if w is not None else {"diverged": 1.0})
                tracking.log_metrics(run, {f"test_cam_hist_1_{b}": float(b == beta) for b in range(10)})
                tracking.end_run(run, "FINISHED" if w is not None else "FAILED")
        running = tracking.child_run(parents[exp], "unfinished", {"method": "gerne", "swept.hparams.beta": 1}, {})
        tracking.log_metrics(running, {"test_wga": 0.0})

    args = build_parser().parse_args(["report", "--heatmap", "--experiment", "sens-a", "--experiment", "sens-b",
                                      "--knob", "hparams.beta", "--out", str(tmp_path / "figs")])
    assert cmd_report(args) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("beta"))
    assert _split(lines[head]) == ["beta", "shortcut=0.2", "shortcut=0.8"]  # the data knob, found by itself
    assert _split(lines[head + 1]) == ["0 (base)", "71.00", "53.00"]
    g = 100 * np.array([0.75 - 0.70, 0.71 - 0.72])
    assert _split(lines[head + 2]) == ["1", f"+{g.mean():.2f} ± {g.std(ddof=1):.2f}",
                                       f"+{100 * (0.62 - 0.50):.2f} (div 1/2)"]  # the RUNNING child left out
    assert {p.name for p in (tmp_path / "figs").iterdir()} == {"heatmap_test_wga.png", "cam_histograms.png"}
    client = MlflowClient(store)
    logged = {a.path for a in client.list_artifacts(parents["sens-a"])}
    assert logged == {"heatmap_test_wga.txt", "heatmap_test_wga.png", "cam_histograms.png"}
    assert not client.list_artifacts(parents["sens-b"])
    with pytest.raises(ValueError, match="no run has hparams.beta = 5"):
        cmd_report(build_parser().parse_args(["report", "--heatmap", "--experiment", "sens-a", "--knob",
                                              "hparams.beta", "--baseline", "5", "--out", str(tmp_path / "f2")]))


def test_fig5_cells_keep_each_head_as_its_own_arm_in_table_d5_order():
    """Runs of S+C with the three classifier heads are three arms (the default head keeps the setting's name),
    S has no head; Table D.5 lists the arms setting by setting, with mean ± std over seeds."""
    from histoweak.report import fig5_cells, format_table_d5

    def run(setting, s, head, f1):
        return {"params": {"method": "segcls", "swept.hparams.setting": setting, "swept.hparams.s": str(s),
                           "hparams.head": head}, "metrics": {"test_f1_micro": f1, "test_f1_macro": f1, "test_miou": f1}}

    runs = [run("S", 5, "official", 0.4), run("S", 5, "table_a3", 0.5), run("S+C", 5, "official", 0.7),
            run("S+C", 5, "official", 0.9), run("S+C", 5, "table_a3", 0.3), run("S+C*", 5, "avgpool", 0.6),
            {"params": {"method": "gerne"}, "metrics": {}}]
    cells = fig5_cells(runs)
    assert set(cells) == {("S", 5.0), ("S+C", 5.0), ("S+C (table_a3)", 5.0), ("S+C* (avgpool)", 5.0)}
    assert cells[("S", 5.0)]["test_f1_macro"] == [0.4, 0.5]
    assert cells[("S+C", 5.0)]["test_f1_macro"] == [0.7, 0.9]
    table = format_table_d5(cells)
    arms = [line.split("  ")[0] for line in table.splitlines()[1:-1:3]]
    assert arms == ["S", "S+C", "S+C (table_a3)", "S+C* (avgpool)"]
    assert "80.0 ± 10.0" in table
