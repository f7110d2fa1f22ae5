"""Where does PSCL's lambda help? lambda x training length (1x, 4x) x 3 seeds under the thesis's stage-1 regime
(SGD, lr 0.1, polynomial decay), one sweep per `partial` setting of the `wsss` preset
(search_spaces/pscl-sensitivity.yaml), then the map of test pseudo-label mIoU and fwIoU gain over lambda = 0,
with the CAM coverage of each class region and the CAM histograms per lambda.

    ray job submit --working-dir . -- python jobs/sensitivity_pscl.py [--partial 0.2 0.7] [--seeds 3]
        [--set hparams.warmup_epochs=1] [--smoke-test] [--report-only]
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import run_command
from histoweak.sensitivity import add_sensitivity_arguments, run_sensitivity

METRICS = ["test_miou", "test_fwiou", "test_coverage"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "pscl-sensitivity.yaml"
    add_sensitivity_arguments(parser, str(space), "partial", [0.2, 0.7])
    args = parser.parse_args()
    return run_command(lambda a: run_sensitivity(a, "hparams.lam", METRICS), args, "sensitivity_pscl")


if __name__ == "__main__":
    sys.exit(main())
