"""`imagegpt classify`: a classifier directory's accuracy and confusion matrix on a labelled dataset."""

from __future__ import annotations

import numpy as np

from ..finetune import classify, format_confusion
from ._options import add_data_arguments, add_device_options, add_output_argument, data_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="accuracy and confusion matrix of a classifier on a dataset",
        description=(
            "Evaluate a classifier directory (imagegpt finetune's OUT or OUT/model, or any transformers "
            "ImageGPTForImageClassification folder with preprocessor_config.json) on one split of a labelled "
            "dataset. Prints accuracy and the confusion matrix; writes classify-SPLIT.json and "
            "confusion-SPLIT.png."
        ),
    )
    parser.add_argument("--model", required=True, help="a classifier directory, or an imagegpt finetune run")
    add_data_arguments(parser)
    parser.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    add_output_argument(
        parser,
        "--out",
        kind="folder",
        default=None,
        help="where to write the report (default: beside the classifier)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    add_output_argument(
        parser, "--cache-dir", kind="folder", default=None, help="cache the dataset's token ids here"
    )
    add_device_options(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    report = classify(
        args.model,
        args.data,
        split=args.split,
        out=args.out,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        data_options=data_options(args),
        cache_dir=args.cache_dir,
    )
    print(
        f"accuracy {100 * report['accuracy']:.2f}% on {report['images']} images ({args.data}, {args.split})"
    )
    if "accuracy_ensemble" in report:
        print(
            f"a BERT classifier: the accuracy above reads each image under one fixed mask; the modal "
            f"prediction over {report['ensemble_masks']} masks per image: "
            f"{100 * report['accuracy_ensemble']:.2f}%"
        )
    print(format_confusion(np.array(report["confusion"]), report["class_names"]))
    print(f"wrote {report['json']} and {report['plot']}")
    return 0
