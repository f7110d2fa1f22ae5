"""Every option of every ``histoweak`` subcommand says what it does; fixed sets of values are argparse choices."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from histoweak.cli import build_parser
from histoweak.slides.tiling import PARAM_CHOICES, TilingParams


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_has_help(command):
    p = _subparsers()[command]
    missing = [a.option_strings[0] for a in p._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
    assert not missing, f"histoweak {command}: options without help: {missing}"


def test_tile_help_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["tile", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag, field in [("--mode", "mode"), ("--tissue-method", "tissue_method"), ("--image-format", "image_format"),
                        ("--tissue-source", "tissue_source")]:
        assert f"{flag} {{{','.join(PARAM_CHOICES[field])}}}" in out, flag
    assert "{grid,centered}" in out and "otsu" in out and "{png,jpeg}" in out
    assert "--stage2" not in out  # a sweep option, not a tiling one


def test_choices_are_what_the_validator_accepts():
    for field, valid in PARAM_CHOICES.items():
        for value in valid:
            TilingParams(**{field: value})
        with pytest.raises(ValueError, match=rf"'{field}': unknown 'nope'; valid: "):
            TilingParams(**{field: "nope"})


def test_bad_choice_exits_2_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "histoweak.cli", "tile", "slides.csv", str(tmp_path / "out"),
                           "--mode", "nope"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "argument --mode: invalid choice: 'nope'" in last and "'centered'" in last, proc.stderr
    assert not (tmp_path / "out").exists()
