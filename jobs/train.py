"""Train one method with Ray Train on a tile table (default: the embedded synthetic dataset).

    ray job submit --working-dir . -- python jobs/train.py --method erm [--data TILE_TABLE] [--config cfg.yaml] [--smoke-test]
"""

import sys

from histoweak.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
