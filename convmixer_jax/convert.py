"""Converts ConvMixer weights between PyTorch state dicts and this project's Orbax checkpoints.

    python -m convmixer_jax.convert --model convmixer_1536_20 --source FILE --out DIR
    python -m convmixer_jax.convert --to timm --source CHECKPOINT --out FILE.safetensors

Sources and layouts: `convmixer_jax.weights.convert`.
"""

from __future__ import annotations

import argparse
import sys

from convmixer_jax.model.flops import count_params
from convmixer_jax.train import checkpointing
from convmixer_jax.weights.convert import (
    ConversionError,
    add_model_arguments,
    convert,
    export_timm,
    model_arguments,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convmixer_jax.convert", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--to", choices=("orbax", "timm"), default="orbax", help="the output format"
    )
    parser.add_argument("--source", required=True, help="PyTorch file, or (--to timm) checkpoint")
    parser.add_argument("--out", required=True, help="checkpoint dir, or (--to timm) .safetensors")
    parser.add_argument(
        "--trust_pickle", action="store_true", help="unpickle arbitrary objects (trusted files)"
    )
    add_model_arguments(parser, required=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.to == "timm":
            state_dict = export_timm(args.source, args.out)
            print(f"wrote {args.out} ({len(state_dict)} tensors)")
            return 0
        if not args.model:
            raise ConversionError("--model: name the variant the weights are for")
        model = convert(
            args.source,
            args.out,
            args.model,
            trust_pickle=args.trust_pickle,
            **model_arguments(args),
        )
    except (ConversionError, checkpointing.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {args.model}, {count_params(model):,} parameters; evaluate "
        f"with --mode eval --config.checkpoint={args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
