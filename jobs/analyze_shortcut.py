"""GERNE's dataset analysis: tiles per group (y, tissue >= tau) per split, and for a trained checkpoint the
shortcut figure (Fig. 1, bottom row) on the test split, logged to MLflow (experiment `shortcut-analysis`).

    ray job submit --working-dir . -- python jobs/analyze_shortcut.py [--data TILES] [--tau 0.03] [--checkpoint DIR]
"""

import sys

from histoweak.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze", *sys.argv[1:]]))
