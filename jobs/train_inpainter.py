"""Train USegMix's inpainting DDPM on your tiles (search_spaces/inpainter.yaml) with Ray Train, recorded in MLflow.

    ray job submit --working-dir . -- python jobs/train_inpainter.py [--data TILES] [--smoke-test]

It prints the best checkpoint; synthesise with it:
`python jobs/tune_usegmix.py --set before.inpainter=diffusion --set before.inpainter_model=<checkpoint>`.
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import add_tune_arguments, cmd_tune, run_command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser, default_space=str(Path(__file__).resolve().parents[1] / "search_spaces" / "inpainter.yaml"))
    return run_command(cmd_tune, parser.parse_args(), "train_inpainter")


if __name__ == "__main__":
    sys.exit(main())
