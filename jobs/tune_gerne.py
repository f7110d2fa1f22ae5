"""Sweep GERNE (search_spaces/gerne.yaml) against the tissue-size shortcut; optionally the baselines too: ERM
(search_spaces/gerne-erm.yaml) and group-balanced resampling (GERNE at c = 1, beta = 0:
search_spaces/gerne-resampling.yaml).

    ray job submit --working-dir . -- python jobs/tune_gerne.py [--data TILES] [--with-erm] [--with-resampling]
        [--seeds 3] [--smoke-test]

Then `histoweak report --table1` prints the paper's Table 1 from the sweeps, with a resampling row.
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    spaces = Path(__file__).resolve().parents[1] / "search_spaces"
    add_tune_arguments(parser, default_space=str(spaces / "gerne.yaml"))
    parser.add_argument("--with-erm", action="store_true", help="also run search_spaces/gerne-erm.yaml (Table 1's ERM rows)")
    parser.add_argument("--erm-space", default=str(spaces / "gerne-erm.yaml"),
                        help="the ERM search space run with --with-erm")
    parser.add_argument("--with-resampling", action="store_true",
                        help="also run search_spaces/gerne-resampling.yaml (c = 1, beta = 0: the resampling row)")
    args = parser.parse_args()

    def both(args):
        code = cmd_tune(args)
        for wanted, space in ((args.with_erm, args.erm_space),
                              (args.with_resampling, str(spaces / "gerne-resampling.yaml"))):
            if wanted and code == 0:
                args.search_space = space
                code = cmd_tune(args)
        return code

    return run_command(both, args, "tune_gerne")


if __name__ == "__main__":
    sys.exit(main())
