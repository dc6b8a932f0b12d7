"""A real example: dense stereo matching with a small patch network, made dense by FDFE, in both backends.

    python examples/stereo.py                  # `make stereo`: both backends, weights/stereo.npz
    python examples/stereo.py --train          # first retrain (PyTorch, through CI) and rewrite the weights
    python examples/stereo.py --backends torch --figure ''        # PyTorch only, no figure

The pair is scikit-image's stereo_motorcycle() (Middlebury 2014 Motorcycle, 500x741, with ground truth).
A siamese patch network Cp (stereo_torch.py, stereo_keras.py: five valid 3x3 convolutions and one 2x2 max
pooling on 18x18 grey patches, unit 32-vectors) gives a descriptor for the patch around every pixel of
both images through CI = FDFE.convert(Cp); the match of left pixel (y, x) is the right pixel (y, x - d),
d = 0..63, of most similar descriptor (cosine similarity volume, winner-take-all, parabola sub-pixel
refinement; optionally a left-right consistency check).  The network was trained on the top half of the
rows only (--train); every score printed is measured on the held-out bottom half.

Anchors, on the same grey images and rows: OpenCV's StereoBM and StereoSGBM (settings printed).  Cp
itself runs on the patches of randomly sampled pixels: CI equals it there, and its time, extrapolated
to every patch, is set against CI's.
"""

import argparse
import io
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for PyTorch's large CPU buffers

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)  # this folder's modules (appended: never ahead of site-packages)

import stereo_matching as sm  # noqa: E402

BACKENDS = {"torch": "PyTorch", "tf": "TensorFlow"}
BM_SETTINGS = dict(numDisparities=64, blockSize=15)
SGBM_BLOCK = 5
SGBM_SETTINGS = dict(minDisparity=0, numDisparities=64, blockSize=SGBM_BLOCK, P1=8 * SGBM_BLOCK ** 2,
                     P2=32 * SGBM_BLOCK ** 2, disp12MaxDiff=1, uniquenessRatio=10, speckleWindowSize=100,
                     speckleRange=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="retrain on the top half of the rows and write --weights")
    p.add_argument("--steps", type=int, default=200, help="training steps (with --train)")
    p.add_argument("--weights", default=sm.WEIGHTS_FILE, help="the weights file (default: %(default)s)")
    p.add_argument("--backends", default="torch,tf", help="comma-separated: torch, tf")
    p.add_argument("--samples", type=int, default=2000, help="sampled pixels whose patches Cp runs on")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of CI (the median is printed)")
    p.add_argument("--figure", default=os.path.join("outputs", "stereo.png"), help="PNG to write ('' for none)")
    p.add_argument("--seed", type=int, default=0, help="the sampled pixels' seed")
    return p.parse_args(argv)


def _median_time(fn, repeats):
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def run_backend(name, weights_path, images, positions, repeats):
    """CI's descriptors of both images, timed; Cp on the sampled pixels' patches, timed and compared."""
    if name == "torch":
        import torch
        import stereo_torch as backend
        version = f"PyTorch {torch.__version__}"
    else:
        import tensorflow as tf
        import stereo_keras as backend
        version = f"TensorFlow {tf.__version__}"
    net, _ = backend.load(weights_path)
    ci = backend.FDFE.convert(net, sm.PATCH)
    backend.dense(ci, images)  # warm-up (first call: graph tracing, allocations)
    features, ci_time = _median_time(lambda: backend.dense(ci, images), repeats)

    batch = torch.from_numpy(np.stack(images))[:, None] if name == "torch" else np.stack(images)[..., None]

    def run_cp():  # Cp on the patches of the sampled pixels, 256 patches per call
        return np.asarray(backend.FDFE.patch_outputs(net, batch, sm.PATCH, positions, batch_size=256, progress=False))

    run_cp()  # warm-up
    cp, cp_time = _median_time(run_cp, 1)
    n, y, x = positions.T
    at_samples = np.stack(features)[n, :, y, x]
    patches = len(images) * images[0].size
    return {"version": version, "features": features, "ci_time": ci_time, "cp_time": cp_time,
            "cp_all": cp_time / len(positions) * patches, "patches": patches,
            "cp_diff": float(np.abs(at_samples - cp).max()), "cp_max": float(np.abs(cp).max())}


def opencv_anchors(left, right):
    """StereoBM and StereoSGBM on the grey images as 8-bit; NaN where they give no disparity."""
    import cv2
    left8, right8 = [np.round(im * 255).astype(np.uint8) for im in (left, right)]
    out = {}
    for label, matcher in (("StereoBM", cv2.StereoBM_create(**BM_SETTINGS)),
                           ("StereoSGBM", cv2.StereoSGBM_create(**SGBM_SETTINGS))):
        start = time.perf_counter()
        raw = matcher.compute(left8, right8)
        seconds = time.perf_counter() - start
        disparity = raw.astype(np.float32) / 16  # fixed point, 4 fractional bits
        out[label] = (np.where(raw >= 0, disparity, np.nan).astype(np.float32), seconds)
    return out


def write_figure(path, pair, ours, backend, sgbm, bm):
    """Left image, ground truth, our disparity (CI of ``backend``), StereoSGBM's, StereoBM's, our error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cut = sm.HELD_OUT_ROWS.start
    disp_map = matplotlib.colormaps["viridis"].copy()
    disp_map.set_bad("black")
    err_map = matplotlib.colormaps["magma"].copy()
    err_map.set_bad((0.5, 0.5, 0.5))
    error = np.abs(ours - pair.gt)
    error[np.isfinite(pair.gt) & ~np.isfinite(ours)] = 99  # no disparity: drawn as the largest error
    panels = [("left image", pair.left_rgb, {}),
              ("ground truth (black: unknown)", pair.gt, dict(cmap=disp_map, vmin=0, vmax=sm.MAX_DISPARITY)),
              (f"ours: CI ({backend}), winner-take-all", ours, dict(cmap=disp_map, vmin=0, vmax=sm.MAX_DISPARITY)),
              ("StereoSGBM (black: none)", sgbm, dict(cmap=disp_map, vmin=0, vmax=sm.MAX_DISPARITY)),
              ("StereoBM (black: none)", bm, dict(cmap=disp_map, vmin=0, vmax=sm.MAX_DISPARITY)),
              ("ours: |error| in px (clipped at 5; grey: no ground truth)", np.ma.masked_invalid(error),
               dict(cmap=err_map, vmin=0, vmax=5))]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
    for ax, (title, image, style) in zip(axes.ravel(), panels):
        if image.ndim == 2 and "cmap" in style:
            image = np.ma.masked_invalid(image)
        shown = ax.imshow(image, interpolation="nearest", **style)
        ax.axhline(cut - 0.5, color="white", lw=1, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if "cmap" in style:
            fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02)
    fig.suptitle(f"skimage stereo_motorcycle: trained on rows above the dashed line, evaluated below it "
                 f"(rows {cut}-{sm.HELD_OUT_ROWS.stop - 1})", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=64)
    plt.close(fig)
    # a 256-colour palette PNG: a fifth of the size, so that the README's copy stays small
    from PIL import Image
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, optimize=True)


def _line(label, scores, extra=""):
    return (f"{label:<26} bad-3 = {scores['bad3']:5.2f}%  bad-1 = {scores['bad1']:5.2f}%  "
            f"no disparity = {scores['missing']:5.2f}%  bad-3 where given = {scores['bad3_given']:5.2f}%{extra}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown or not backends:
        raise SystemExit(f"--backends: choose from {sorted(BACKENDS)}, got {args.backends!r}")
    pair = sm.load_pair()
    h, w = pair.left.shape
    if args.train:
        import stereo_torch
        print(f"training on rows {sm.TRAIN_ROWS.start}-{sm.TRAIN_ROWS.stop - 1} ({args.steps} steps) ...")
        arrays, seconds = stereo_torch.train(pair, steps=args.steps)
        sm.save_weights(arrays, args.weights)
        print(f"training took {seconds:.1f} s; wrote {args.weights}")
    weights = sm.load_weights(args.weights)
    images = [sm.normalise(pair.left, weights), sm.normalise(pair.right, weights)]
    rows = sm.HELD_OUT_ROWS
    print(f"Stereo pair: skimage.data.stereo_motorcycle(), {h}x{w}, grey; disparities 0-{sm.MAX_DISPARITY}; "
          f"patch {sm.PATCH[0]}x{sm.PATCH[1]}; weights {os.path.relpath(args.weights)} (trained on rows "
          f"{sm.TRAIN_ROWS.start}-{sm.TRAIN_ROWS.stop - 1} only)")

    rng = np.random.default_rng(args.seed)
    positions = np.stack([rng.integers(0, 2, args.samples), rng.integers(0, h, args.samples),
                          rng.integers(0, w, args.samples)], axis=1)
    results = {}
    for name in backends:
        r = run_backend(name, args.weights, images, positions, args.repeats)
        start_match = time.perf_counter()
        r["disparity"], volume, r["integer"] = sm.match(*r["features"])
        r["match_time"] = time.perf_counter() - start_match
        r["checked"] = np.where(sm.left_right_check(r["integer"], volume), r["disparity"], np.nan)
        r["volume"] = volume
        results[name] = r
        print(f"{r['version']}: CI on both images {r['ci_time']:.2f} s (median of {args.repeats}); Cp on "
              f"{args.samples} sampled patches {r['cp_time']:.2f} s -> on all {r['patches']} patches about "
              f"{r['cp_all']:.1f} s (extrapolated); speedup of CI {r['cp_all'] / r['ci_time']:.0f}x")
        print(f"  CI = Cp on the sampled patches: max |CI - Cp| = {r['cp_diff']:.1e} (unit descriptors, "
              f"largest |Cp| {r['cp_max']:.2f}); matching (volume, winner-take-all, sub-pixel) {r['match_time']:.2f} s")
    if len(results) == 2:
        a, b = results["torch"], results["tf"]
        same = a["integer"] == b["integer"]
        diff = max(float(np.abs(fa - fb).max()) for fa, fb in zip(a["features"], b["features"]))
        sub = float(np.abs(a["disparity"] - b["disparity"])[same].max())
        print(f"TensorFlow vs PyTorch: largest descriptor difference {diff:.1e}; winner-take-all disparity "
              f"equal at {same.sum()} of {same.size} pixels, and there the sub-pixel disparities differ by at "
              f"most {sub:.1e} px")
        if not same.all():
            # where they differ: how close the two winners' similarities are (in PyTorch's volume)
            y, x = np.nonzero(~same)
            gap = np.abs(a["volume"][a["integer"][y, x], y, x] - a["volume"][b["integer"][y, x], y, x])
            print(f"  where they differ ({len(y)} pixel{'s' * (len(y) > 1)}): near-ties, the two winners' "
                  f"similarities in PyTorch's volume differ by at most {gap.max():.1e}")

    anchors = opencv_anchors(pair.left, pair.right)
    print()
    print(f"Held-out rows {rows.start}-{rows.stop - 1}, {int(np.isfinite(pair.gt[rows]).sum())} pixels with ground "
          f"truth. bad-k: share of them whose disparity is missing or off by more than k px")
    for name, r in results.items():
        print(_line(f"CI ({BACKENDS[name]})", sm.evaluate(r["disparity"], pair.gt, rows)))
        print(_line(f"CI ({BACKENDS[name]}) + LR check", sm.evaluate(r["checked"], pair.gt, rows)))
    for label, (disparity, seconds) in anchors.items():
        print(_line(label, sm.evaluate(disparity, pair.gt, rows), f"  ({seconds:.2f} s)"))
    print(f"StereoBM: {BM_SETTINGS}; StereoSGBM: {SGBM_SETTINGS}; OpenCV defaults otherwise, on the same grey "
          f"images as 8-bit")
    if args.figure:
        write_figure(args.figure, pair, results[backends[0]]["disparity"], BACKENDS[backends[0]],
                     anchors["StereoSGBM"][0], anchors["StereoBM"][0])
        print(f"figure written to {args.figure}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
