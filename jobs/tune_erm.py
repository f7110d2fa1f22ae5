"""Sweep ERM's learning rate and weight decay (search_spaces/erm.yaml) on Ray Tune, recorded in MLflow.

    ray job submit --working-dir . -- python jobs/tune_erm.py [--data TILE_TABLE] [--smoke-test]
"""

import argparse
import sys

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space="search_spaces/erm.yaml")
    return run_command(cmd_tune, parser.parse_args(), "tune_erm")


if __name__ == "__main__":
    sys.exit(main())
