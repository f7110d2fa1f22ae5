"""MagNets (search_spaces/magnet.yaml): the sweep over layers, patches per layer, sampler and learning rate on a
slide table, on Ray Tune, recorded in MLflow (AUROC per metastasis size class, pixels read against tiling, and
the zoom path of every test slide as a figure).

    ray job submit --working-dir . -- python jobs/tune_magnet.py [--data SLIDE_TABLE] [--smoke-test]

Then `histoweak report --magnet` prints the paper's Table 1 layout from it.
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space=str(Path(__file__).resolve().parents[1] / "search_spaces" / "magnet.yaml"))
    return run_command(cmd_tune, parser.parse_args(), "tune_magnet")


if __name__ == "__main__":
    sys.exit(main())
