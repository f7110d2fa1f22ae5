"""`make demo-data`: the data plane end to end on the embedded defaults (`make demo` runs the PSCL sweep).

    python jobs/demo.py [--workdir .cache/demo] [--smoke-test]
"""

import argparse

from histoweak.demo import run_data_plane_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".cache/demo",
                    help="where the synthetic slides and the tile table go (default: %(default)s)")
    ap.add_argument("--smoke-test", action="store_true", help="tiny slides, one batch")
    args = ap.parse_args()
    if args.smoke_test:
        run_data_plane_demo(args.workdir + "-smoke", preset="tiny", n_batches=1)
    else:
        run_data_plane_demo(args.workdir)


if __name__ == "__main__":
    main()
