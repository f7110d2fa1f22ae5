"""Segmentation from classification labels, Ciga & Martel (search_spaces/segcls.yaml): S, S+C, S+C* vs s %, on Ray Tune, recorded in MLflow.

    ray job submit --working-dir . -- python jobs/tune_segcls.py [--data TILES] [--seeds N] [--smoke-test]

Then `histoweak report --fig5` draws the paper's Fig. 5 from it. Runs unchanged on a laptop (the embedded
synthetic WSSS slides) and on a GPU cluster (one trial per GPU).
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space=str(Path(__file__).resolve().parents[1] / "search_spaces" / "segcls.yaml"))
    return run_command(cmd_tune, parser.parse_args(), "tune_segcls")


if __name__ == "__main__":
    sys.exit(main())
