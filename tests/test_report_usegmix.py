"""USegMix's Table 1: the Avg↑ definition against the paper's own printed numbers, seeds into mean ± std,
baseline rows, and the layout."""

import re

import numpy as np
import pytest

from histoweak.report import format_usegmix_table, usegmix_cells, usegmix_gain

# Wang & Kwak, Table 1: model -> test set -> [(Acc %, F1, Kappa) for No, 300, 600], printed Avg↑ for 300, 600
PAPER = {
    "EfficientNet-B0": {
        "Test I": ([(85.52, .8062, .9251), (87.28, .8368, .9397), (86.34, .8193, .9305)], (0.025, 0.011)),
        "Test II": ([(79.01, .7118, .8623), (79.69, .7387, .8845), (80.23, .7286, .8698)], (0.024, 0.016)),
        "Prostate": ([(68.04, .6339, .6043), (67.64, .6219, .6081), (70.57, .6290, .6046)], (-0.006, 0.010)),
    },
    "ResNet-50": {
        "Test I": ([(85.33, .8141, .8767), (85.83, .8255, .9295), (86.40, .8279, .9041)], (0.027, 0.020)),
        "Test II": ([(78.24, .7081, .8381), (78.28, .7211, .8800), (78.47, .7158, .8229)], (0.023, -0.001)),
        "Prostate": ([(68.89, .6208, .5935), (67.93, .6082, .5970), (69.27, .6089, .6010)], (-0.009, -0.000)),
    },
    "DenseNet121": {
        "Test I": ([(87.03, .8360, .9382), (86.90, .8297, .9335), (87.34, .8309, .9401)], (-0.005, -0.000)),
        "Test II": ([(78.87, .7155, .8696), (82.26, .7429, .8927), (81.41, .7423, .8919)], (0.036, 0.032)),
        "Prostate": ([(67.71, .5883, .6126), (69.48, .6152, .6054), (64.55, .5911, .5374)], (-0.020, -0.055)),
    },
    "CTransPath": {
        "Test I": ([(87.97, .8385, .9436), (86.78, .8207, .9380), (87.72, .8373, .9423)], (-0.014, -0.002)),
        "Test II": ([(81.84, .7518, .9027), (82.32, .7642, .9055), (79.53, .7388, .8944)], (0.008, -0.018)),
        "Prostate": ([(72.34, .6440, .6208), (72.03, .6403, .6221), (71.58, .6480, .6249)], (-0.003, 0.001)),
    },
}
# Printed -0.020, but the row's own numbers rise by +2.6 % (Acc) and +4.6 % (F1) and fall by 1.2 % (Kappa).
MISPRINT = ("DenseNet121", "Prostate", 300)


def _m(acc_pct, f1, kappa):
    return {"test_acc": acc_pct / 100, "test_f1_macro": f1, "test_kappa": kappa}


def _cells(line: str) -> list[str]:
    """A table line's cells (columns are separated by two or more spaces; a model's later rows start blank)."""
    return re.split(r" {2,}", line.strip())


def _run(backbone, n, acc_pct, f1, kappa, seed=0, mix=None, swept=True):
    p = {"method": "usegmix", "hparams.backbone": backbone, "train.seed": str(seed)}
    if n is not None:
        p["swept.hparams.synthetic_per_class" if swept else "hparams.synthetic_per_class"] = str(n)
    if mix is not None:
        p["hparams.mix"] = mix
    return {"params": p, "metrics": _m(acc_pct, f1, kappa)}


@pytest.mark.parametrize("model,test", [(m, t) for m in PAPER for t in PAPER[m]])
def test_gain_reproduces_the_papers_avg_column(model, test):
    rows, printed = PAPER[model][test]
    for n, row, want in zip((300, 600), rows[1:], printed):
        got = usegmix_gain(_m(*rows[0]), _m(*row))
        by_hand = np.mean([(row[i] - rows[0][i]) / rows[0][i] for i in range(3)])
        assert got == pytest.approx(by_hand, abs=1e-12)
        if (model, test, n) == MISPRINT:
            assert f"{got:.3f}" == f"{-want:.3f}"
        else:
            assert f"{got:.3f}" == f"{want:.3f}", (model, test, n)


def test_absolute_gain_would_not_reproduce_the_paper():
    """The mean of absolute differences (the other reading of "Avg↑") misses the printed 0.025."""
    (base, row, _), _ = PAPER["EfficientNet-B0"]["Test I"]
    absolute = np.mean([(row[0] - base[0]) / 100, row[1] - base[1], row[2] - base[2]])
    assert f"{absolute:.3f}" == "0.021" != f"{usegmix_gain(_m(*base), _m(*row)):.3f}" == "0.025"


def test_paper_table_from_runs_prints_its_avg_column():
    runs = [_run(model, n, *row) for model in ("EfficientNet-B0", "ResNet-50")
            for n, row in zip((0, 300, 600), PAPER[model]["Test I"][0])]
    table = format_usegmix_table(usegmix_cells(runs), title="Test I")
    lines = table.splitlines()
    print(table)
    assert lines[0] == "Test I"
    assert _cells(lines[1]) == ["Model", "Synthesis per class", "Acc(%)", "F1", "Kappa", "Avg↑"]
    body = [_cells(line) for line in lines[2:8]]
    assert body[0] == ["EfficientNet-B0", "No", "85.52", "0.8062", "0.9251"]
    assert body[1] == ["300", "87.28", "0.8368", "0.9397", "0.025"]
    assert body[2] == ["600", "86.34", "0.8193", "0.9305", "0.011"]
    assert body[3] == ["ResNet-50", "No", "85.33", "0.8141", "0.8767"]
    assert [b[-1] for b in body[4:6]] == ["0.027", "0.020"]


def test_seeds_aggregate_to_mean_and_sample_std():
    runs = [_run("resnet50", 0, 80.0, 0.70, 0.80, seed=0), _run("resnet50", 0, 82.0, 0.74, 0.84, seed=1),
            _run("resnet50", 0, 84.0, 0.72, 0.88, seed=2),
            _run("resnet50", 24, 85.0, 0.75, 0.85, seed=0), _run("resnet50", 24, 87.0, 0.77, 0.89, seed=1)]
    cells = usegmix_cells(runs)
    assert set(cells) == {("resnet50", 0), ("resnet50", 24)}
    assert cells[("resnet50", 0)]["test_acc"] == pytest.approx([0.80, 0.82, 0.84])
    table = format_usegmix_table(cells)
    no, plus = (_cells(line) for line in table.splitlines()[1:3])
    acc = 100 * np.array([0.80, 0.82, 0.84])
    assert f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}" == "82.00 ± 2.00"
    assert no == ["resnet50", "No", "82.00 ± 2.00", "0.7200 ± 0.0200", "0.8400 ± 0.0400"]
    gain = np.mean([(86.0 - 82.0) / 82.0, (0.76 - 0.72) / 0.72, (0.87 - 0.84) / 0.84])  # from the means
    assert plus == ["24", "86.00 ± 1.41", "0.7600 ± 0.0141", "0.8700 ± 0.0283", f"{gain:.3f}"]
    assert "runs per cell: 2/3" in table


def test_baseline_rows_follow_the_counts_and_fixed_params_count():
    runs = [_run("effnet", 0, 80.0, 0.70, 0.80), _run("effnet", 48, 81.0, 0.71, 0.81),
            _run("effnet", 24, 82.0, 0.72, 0.82, swept=False),
            _run("effnet", None, 79.0, 0.69, 0.79, mix="mixup"),  # an ERM run: no synthetic count
            _run("effnet", 0, 83.0, 0.73, 0.83, mix="cutmix"), _run("effnet", 0, 80.0, 0.70, 0.80, mix="none"),
            _run("effnet", 24, 84.0, 0.74, 0.84, mix="cutmix"),
            {"params": {"hparams.backbone": "effnet"}, "metrics": {"test_acc": 0.5}},  # unfinished: left out
            {"params": {"method": "erm"}, "metrics": _m(50.0, 0.5, 0.5)}]  # no backbone: left out
    cells = usegmix_cells(runs)
    assert set(cells) == {("effnet", s) for s in (0, 24, 48, "mixup", "cutmix", "cutmix+24")}
    assert len(cells[("effnet", 0)]["test_acc"]) == 2  # mix "none" is no baseline
    lines = format_usegmix_table(cells).splitlines()[1:-1]  # no title: the header, rows, the note
    rows = [_cells(line)[1 if i == 0 else 0] for i, line in enumerate(lines)]
    assert rows == ["No", "24", "48", "cutmix", "cutmix+24", "mixup"]


def test_missing_no_row_and_bad_bases_are_explicit():
    table = format_usegmix_table(usegmix_cells([_run("vit", 24, 80.0, 0.7, 0.8)]))
    assert _cells(table.splitlines()[1])[-1] == "-"
    with pytest.raises(ValueError, match="test_kappa"):
        usegmix_gain({"test_acc": 1, "test_f1_macro": 1}, _m(1, 1, 1))
    with pytest.raises(ValueError, match="non-zero"):
        usegmix_gain(_m(0, 0.5, 0.5), _m(1, 1, 1))
