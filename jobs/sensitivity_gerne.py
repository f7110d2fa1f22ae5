"""Where does GERNE's beta help? beta (at c = 1: beta = 0 is resampling, the grid ends under the Eq. 9 bound) x
learning rate x 3 seeds, one sweep per `shortcut` strength of the `gerne` preset
(search_spaces/gerne-sensitivity.yaml), then the map of test WGA gain over beta = 0 (tau 0.1 and 0.03).

    ray job submit --working-dir . -- python jobs/sensitivity_gerne.py [--shortcut 0.2 0.5 0.8] [--seeds 3]
        [--resnet50 /path/resnet50.pth] [--smoke-test] [--report-only]

Without --resnet50 the backbone is ImageNet EfficientNet-Lite0 (ships offline); with it, the paper's ResNet-50.
Trials that diverge (non-finite loss) end as such and are counted on the map.
"""

import argparse
import sys
from pathlib import Path

from histoweak.cli import run_command
from histoweak.sensitivity import add_sensitivity_arguments, run_sensitivity

METRICS = ["test_wga", "test_tau0.03_wga", "test_bca"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "gerne-sensitivity.yaml"
    add_sensitivity_arguments(parser, str(space), "shortcut", [0.2, 0.5, 0.8])
    parser.add_argument("--resnet50", default=None, metavar="PATH",
                        help="the paper's backbone: an ImageNet ResNet-50 state dict (a local file)")
    args = parser.parse_args()
    if args.resnet50:
        if not Path(args.resnet50).is_file():
            parser.error(f"--resnet50 {args.resnet50}: no such file")
        args.overrides += ["hparams.backbone=resnet50", f"hparams.weights={Path(args.resnet50).resolve()}"]
    return run_command(lambda a: run_sensitivity(a, "hparams.beta", METRICS), args, "sensitivity_gerne")


if __name__ == "__main__":
    sys.exit(main())
