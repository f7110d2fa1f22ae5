"""Tile slides into a Parquet tile table on the current Ray cluster.

    ray job submit --working-dir . -- python jobs/tile_slides.py SLIDES OUT [--masks DIR] [--classes classes.json]

SLIDES is a directory, a glob pattern or a CSV (slide_id,path[,mask_path,label,split]) of local files
(OpenSlide reads only local files: on a cluster, every node must see them at the same path). OUT is a
directory or a URI every node can write, e.g. s3://bucket/tiles/name, with credentials and endpoint from
the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL).
--smoke-test tiles a tiny synthetic dataset instead.
"""

import argparse
import sys
import tempfile

from histoweak.cli import add_tiling_arguments, run_tiling, run_command


def main() -> int:
    if "--smoke-test" in sys.argv:
        from histoweak.data.synthetic import synthesize

        tmp = tempfile.mkdtemp(prefix="histoweak-smoke-")
        csv_path = synthesize(f"{tmp}/synth", "tiny")
        sys.argv = [sys.argv[0], str(csv_path), f"{tmp}/tiles", "--tile-size", "128"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tiling_arguments(parser)
    parser.add_argument("--smoke-test", action="store_true",
                        help="tile a tiny synthetic dataset instead (SLIDES, OUT and the other options are ignored)")
    return run_command(run_tiling, parser.parse_args(), "tile_slides")


if __name__ == "__main__":
    sys.exit(main())
