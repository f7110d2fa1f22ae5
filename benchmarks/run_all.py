"""`make bench`: every benchmark, each a ratio against a baseline measured in the same run.

Tables are printed and written to benchmarks/results/<name>.json.
"""

import sys
import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_gerne_step  # noqa: E402
import bench_pscl_loss  # noqa: E402
import bench_scale  # noqa: E402
import bench_streaming  # noqa: E402
import bench_train  # noqa: E402
import bench_tiling  # noqa: E402
import gerne_vs_erm  # noqa: E402
import pscl_vs_cam  # noqa: E402
import segcls_settings  # noqa: E402
import bench_usegmix_inpaint  # noqa: E402
import bench_usegmix_segments  # noqa: E402
import usegmix_counts  # noqa: E402
import magnet_vs_tiling  # noqa: E402


def main() -> None:
    quick = "--quick" in sys.argv
    size = ["--size", "4096"] if quick else []
    pscl = bench_pscl_loss.main(["--batch", "2"] if quick else [])  # before Ray starts: it times CPU-bound subprocesses
    gerne_step = bench_gerne_step.main(["--quick"] if quick else [])
    segments = bench_usegmix_segments.main(["--quick"])  # CPU-bound, before Ray: LiteMedSAM is minutes per tile
    inpaint = bench_usegmix_inpaint.main([])
    tiling = bench_tiling.main(size)
    import ray

    ray.shutdown()  # the streaming benchmark forks its baselines before starting Ray
    streaming = bench_streaming.main(size)
    ray.shutdown()
    scale = bench_scale.main([])  # a million 64-px JPEG tiles, ~2.5 min (the table is generated once, ~10 s)
    ray.shutdown()
    train = bench_train.main(["--trials", "4"] if quick else [])
    gerne = gerne_vs_erm.main(["--quick"])  # the Table 1 and the (c, beta) map: python benchmarks/gerne_vs_erm.py
    pscl_cam = pscl_vs_cam.main(["--quick"])  # the full comparison: python benchmarks/pscl_vs_cam.py
    segcls = segcls_settings.main(["--quick"])  # the full Fig. 5 / Table D.5: python benchmarks/segcls_settings.py
    usegmix = usegmix_counts.main(["--quick"])  # the full Table 1 + KID: python benchmarks/usegmix_counts.py
    magnet = magnet_vs_tiling.main(["--quick"])  # the full Table 1 (3 seeds): python benchmarks/magnet_vs_tiling.py
    print("\n== summary ==")
    print(f"tiling: histoweak / DeepZoom single process = {tiling['ratio']:.2f}x (goal >= 1.9x); DeepZoom split over "
          f"every core by multiprocessing = {tiling['ceiling']:.2f}x")
    print(f"streaming: histoweak / DataLoader = {streaming['vs_dataloader']:.2f}x (goal >= 1.0x), "
          f"of ceiling = {streaming['vs_ceiling']:.0%} (goal >= 80%); JPEG tiles {streaming['jpeg_vs_dataloader']:.2f}x, "
          f"{streaming['jpeg_vs_ceiling']:.0%} of ceiling; with a model step per batch {streaming['train_vs_dataloader']:.2f}x")
    print(f"streaming, shuffled (the training stream): EpochShuffle / DataLoader(shuffle=True) = "
          f"{streaming['shuffled_vs_dataloader']:.2f}x (goal >= 1.0x), of ceiling = {streaming['shuffled_vs_ceiling']:.0%} "
          f"(goal >= 80%), vs the unshuffled stream {streaming['shuffled_vs_unshuffled']:.2f}x; JPEG "
          f"{streaming['jpeg_shuffled_vs_dataloader']:.2f}x; with a model step {streaming['shuffled_train_vs_dataloader']:.2f}x")
    print(f"a million tiles: stream {scale['steady_img_s']:.0f} img/s, first batch {scale['first_batch_s']:.1f} s; "
          f"driver peak RSS {scale['driver_peak_rss_mb']:.0f} MB, Ray workers {scale['workers_peak_uss_mb']:.0f} MB "
          f"(USS); balanced sampler {scale['sampler_img_s']:.0f} img/s, driver peak "
          f"{scale['sampler_driver_peak_rss_mb']:.0f} MB; group counts {scale['group_counts_s']:.1f} s")
    print(f"training: Ray Train / plain PyTorch steps/s = {train['train_ratio']:.2f}x (goal >= 0.9x)")
    print(f"sweep: wall time / sum of trial training time = {train['sweep_ratio']:.2f}x")
    print(f"gerne step: GERNE (two forward passes) / ERM on as many images = {gerne_step['gerne_vs_erm']:.2f}x "
          "(goal <= 1.15x)")
    print("gerne vs resampling (short form): " + ", ".join(f"test WGA gain at tau={t:g}: {100 * g:+.1f} points"
                                                           for t, g in gerne["wga_gain"].items()))
    print(f"pscl vs cam (short form): pseudo-label test mIoU gain {pscl_cam['miou_gain']:+.1f} points (goal >= +3)")
    print("segcls (short form): S+C - S, test F1 macro: " + ", ".join(f"{g:+.1f} points at s={s:g} %" for s, g in
                                                                   segcls["gain"].items())
          + f"; S+C* - S at 100 %: {segcls['full_gap']:+.1f} (goals: >= +10 at 5 %, within 5 at 100 %)")
    print("usegmix (short form): test F1 macro vs no synthesis: " + ", ".join(
        f"{k} {g:+.1f} points" for k, g in usegmix["gains"].items()) + "; KID x1000 vs held-out real: " + ", ".join(
        f"{k} {v:.1f}" for k, v in usegmix["kid"].items()))
    print("magnet (short form): test AUROC " + ", ".join(
        f"{name}: {100 * np.nanmean(c.get('test_auroc', [np.nan])):.0f}, pixels read / tiling "
        f"1/{np.nanmean(c.get('test_pixels_ratio', [np.nan])):.1f}" for name, c in magnet.items()))
    print("usegmix phase 1, segments/s: " + ", ".join(f"{k} {v:.2f}" for k, v in segments.items())
          + "; phase 2, s per image: " + ", ".join(f"{k} {v:.3f}" for k, v in inpaint.items()))
    if pscl["max_rel_diff"] is None:
        print("pscl loss: no SupConLoss baseline (pytorch-metric-learning not installed)")
    else:
        print(f"pscl loss: equals SupConLoss to {pscl['max_rel_diff']:.1e} (relative); peak memory at "
              f"{pscl['compared_at']} = {pscl['memory_ratio']:.2f}x SupConLoss's")


if __name__ == "__main__":
    main()
