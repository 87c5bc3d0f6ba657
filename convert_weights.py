"""Convert PyTorch checkpoints to haaqi_jax parameter directories.

    python convert_weights.py BEATs_iter3_plus_AS2M.pt checkpoints/beats_iter3_as2m
    python convert_weights.py --haaqinet best_loss.pth checkpoints/haaqinet_released

Thin wrapper over haaqi_jax.convert (the only place torch is imported).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="the .pt / .pth file")
    parser.add_argument("out_dir", help="parameter directory to create")
    parser.add_argument("--haaqinet", action="store_true",
                        help="SRC is the released HAAQI-Net checkpoint (BEATs + head)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="BEATs only: torch.load(weights_only=False) (trusted files only)")
    args = parser.parse_args(argv)
    try:
        if args.haaqinet:
            from haaqi_jax.convert.haaqinet_torch import convert_haaqinet
            out = convert_haaqinet(args.src, args.out_dir, overwrite=args.overwrite)
        else:
            from haaqi_jax.convert.beats_torch import convert_beats_checkpoint
            out = convert_beats_checkpoint(args.src, args.out_dir, overwrite=args.overwrite,
                                           allow_pickle=args.allow_pickle)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
