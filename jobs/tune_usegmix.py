"""USegMix (search_spaces/usegmix.yaml): segment pool → synthetic tiles (if missing) → the sweep over synthetic
tiles per class × backbone × seed, on Ray Tune, recorded in MLflow.

    ray job submit --working-dir . -- python jobs/tune_usegmix.py [--data TILES] [--seeds N] [--smoke-test]

Then `histoweak report --usegmix` prints the paper's Table 1 from it.
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space=str(Path(__file__).resolve().parents[1] / "search_spaces" / "usegmix.yaml"))
    return run_command(cmd_tune, parser.parse_args(), "tune_usegmix")


if __name__ == "__main__":
    sys.exit(main())
