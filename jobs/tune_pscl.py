"""The flagship sweep: PSCL weakly-supervised segmentation (search_spaces/pscl.yaml) on Ray Tune, recorded in MLflow.

    ray job submit --working-dir . -- python jobs/tune_pscl.py [--data TILES] [--stage2] [--smoke-test]

Runs unchanged on a laptop (the embedded synthetic WSSS slides) and on a GPU cluster (one trial per GPU).
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space=str(Path(__file__).resolve().parents[1] / "search_spaces" / "pscl.yaml"))
    return run_command(cmd_tune, parser.parse_args(), "tune_pscl")


if __name__ == "__main__":
    sys.exit(main())
