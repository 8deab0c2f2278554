"""`imagegpt finetune`: a pretrained model -> a classifier, trained on the paper's L_clf + W * L_gen."""

from __future__ import annotations

import argparse

from ..errors import ArgumentError
from ..finetune import FinetuneOptions, run_finetune
from ._options import EXIT_STATUS, add_data_arguments, add_device_options, add_output_argument, data_options

EXAMPLE = """examples:
  imagegpt finetune --model runs/shapes/model --data shapes --out ft-shapes --epochs 5
  imagegpt finetune --model runs/digits/model --data digits --out ft-digits --layer 2 --gen-weight 0
  imagegpt finetune --resume ft-shapes            # continue an interrupted run
  imagegpt classify --model ft-shapes --data shapes
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained model into a classifier",
        description=(
            "Fine-tune every weight of a pretrained model on a labelled dataset with L_clf + W * L_gen "
            "(inputs [SOS, x0, ..., x_{n-2}]), keeping the classifier of the best validation accuracy in "
            "OUT/model, a transformers ImageGPTForImageClassification directory. With --layer L the head "
            "sits after block L and the saved classifier has n_layer = L (its ln_f starts as block L's ln_1, "
            "so it reads the probe's feature of layer L). Ctrl-C saves a checkpoint; --resume continues."
        ),
        epilog=EXAMPLE + "\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", help="a pretrained model directory (imagegpt train's model/)")
    add_data_arguments(parser, required=False)  # not needed with --resume
    add_output_argument(
        parser, "--out", kind="folder", help="the run directory; the classifier is written to OUT/model"
    )
    add_output_argument(
        parser,
        "--resume",
        kind="folder",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint",
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="put the head after block L (default: the final layer)"
    )
    parser.add_argument("--gen-weight", type=float, default=1.0, help="W in L_clf + W * L_gen (0: no L_gen)")
    augment = parser.add_mutually_exclusive_group()
    augment.add_argument(
        "--augment",
        dest="augment",
        action="store_true",
        default=None,
        help="random crops after reflect padding (4 px at 32x32) and horizontal flips (default: on, "
        "except for digits and MNIST-style data)",
    )
    augment.add_argument("--no-augment", dest="augment", action="store_false")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument(
        "--epochs", type=float, default=None, help="passes over the training split (default 10)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="peak learning rate (warmup, then cosine to 0); small models like more (3e-3 for igpt-micro)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default: 5%% of the run, <= 100)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="steps between validations (default: 1 epoch)"
    )
    parser.add_argument(
        "--patience",
        type=int,
        default=5,
        help="stop after this many validations without improvement (0: never)",
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, metavar="N", help="stop after N steps; continue with --resume"
    )
    add_device_options(parser, training=True)
    parser.set_defaults(func=run)


def options_from_args(args) -> tuple[FinetuneOptions, bool]:
    """(FinetuneOptions, resume) from parsed arguments; with --resume, run_finetune reads the run's own."""
    if args.resume:
        out, resume = args.resume, True
    else:
        missing = [f"--{name}" for name in ("model", "data", "out") if getattr(args, name) is None]
        if missing:
            raise ArgumentError(f"{', '.join(missing)} required (or --resume RUN_DIR to continue a run)")
        out, resume = args.out, False
    options = FinetuneOptions(
        model_dir=args.model,
        data=args.data,
        layer=args.layer,
        gen_weight=args.gen_weight,
        augment=args.augment,
        steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        patience=args.patience or None,
        seed=args.seed,
        data_options=data_options(args),
        dtype=args.dtype,
        out=out,
        device=args.device,
        stop_after=args.stop_after,
        progress=True,
    )
    return options, resume


def run(args) -> int:
    options, resume = options_from_args(args)
    summary = run_finetune(options, resume=resume)
    print(
        f"{summary['status']} at step {summary['step']}/{summary['steps']}: best validation accuracy "
        f"{100 * summary['best_val_accuracy']:.2f}% (step {summary['best_step']}); "
        f"classifier in {summary['model']}"
    )
    return 0 if summary["signal"] is None else 128 + summary["signal"]  # as shells report it: 130, 143
