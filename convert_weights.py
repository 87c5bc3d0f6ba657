"""Convert PyTorch checkpoints to haaqi_jax parameter directories.

    python convert_weights.py BEATs_iter3_plus_AS2M.pt checkpoints/beats_iter3_as2m
    python convert_weights.py --haaqinet haaqi_net_best.pth checkpoints/haaqinet_released
    python convert_weights.py --haaqinet model.pth out/ --beats-config BEATs_finetuned.pt
    python convert_weights.py --haaqinet best_loss.pth out/ --beats BEATs_iter3_plus_AS2M.pt

BEATs: a microsoft/unilm checkpoint ({'cfg', 'model'}; pre-trained or fine-tuned, whose
predictor and label_dict are kept). HAAQI-Net: the authors' file with the BEATs encoder inside
(`beats_model.*` keys, as their model/haaqi_net_best.pth); its BEATs is the released
BEATs_iter3+ size unless --beats-config names the cfg of another one. A head-only HAAQI-Net
file (their trainer's best_loss.pth) takes its encoder, weights and cfg, from --beats: the
BEATs .pt it was trained on, or that BEATs converted by this tool. Their distilled model
(haaqi_net_distillBEATs.pth) converts alone, its student computing as released. Thin wrapper over
haaqi_jax.convert (the only place torch is imported). Exit codes: 0 written, 2 a bad file or
path (one line on stderr; HAAQI_JAX_TRACEBACK=1 adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys


def _summary(out) -> str:
    """What was written: kind, sizes and what came along, read back from config.json."""
    import json
    meta = json.loads((out / "config.json").read_text())
    if meta.get("kind") == "beats":
        cfg = meta["cfg"]
        extra = (f", fine-tuned predictor of {cfg.get('predictor_class')} classes kept"
                 + (" with its label_dict" if "label_dict" in meta else "")
                 if cfg.get("finetuned_model") else "")
        return (f"BEATs, {cfg['encoder_layers']} layers x {cfg['encoder_embed_dim']}{extra}")
    cfg = meta.get("config", {})
    encoder, head = cfg.get("encoder_config", {}), cfg.get("head", {})
    if cfg.get("encoder_kind") == "student":
        beats = encoder.get("beats", {})
        skipped = (meta.get("not_converted") or {}).get("keys", [])
        return (f"the authors' distilled HAAQI-Net: student of {encoder.get('num_layers')} "
                f"layers x {beats.get('encoder_embed_dim')}, attention "
                f"{encoder.get('attention')!r} as released, head BLSTM "
                f"{head.get('lstm_hidden')} x 2 over the weighted layers"
                + (f"; not converted: {', '.join(skipped)} (distillation prediction heads)"
                   if skipped else ""))
    mode = (f"weighted sum of layers {cfg.get('feature_layers')}"
            if cfg.get("feature_mode") == "weighted" else "last layer")
    layers = head.get("lstm_layers", 1)
    blstm = (f"{layers} layers of " if layers > 1 else "") + f"BLSTM {head.get('lstm_hidden')} x 2"
    return (f"HAAQI-Net on BEATs {encoder.get('encoder_layers')} layers x "
            f"{encoder.get('encoder_embed_dim')} ({mode}), head {blstm}, "
            f"{head.get('num_heads')} attention heads")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 written; 2 a bad file, path or option (one line on stderr); "
               "130 interrupted")
    parser.add_argument("src", help="the .pt / .pth file")
    parser.add_argument("out_dir", help="parameter directory to create")
    parser.add_argument("--haaqinet", action="store_true",
                        help="SRC is a HAAQI-Net checkpoint with its BEATs (beats_model.* keys)")
    parser.add_argument("--beats-config", default=None, metavar="PATH",
                        help="--haaqinet: the BEATs its encoder was built from, when not the "
                             "released BEATs_iter3+: that BEATs .pt, its converted folder, or "
                             "a JSON file of its cfg")
    parser.add_argument("--beats", default=None, metavar="PATH",
                        help="--haaqinet with a head-only file (the authors' trainer's "
                             "best_loss.pth): the BEATs it was trained on, its .pt or its "
                             "folder converted by this tool")
    parser.add_argument("--num-heads", type=int, default=16,
                        help="--haaqinet: attention heads of the head (not stored in the file; "
                             "16 as released)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR if it is an earlier output of this tool (never "
                             "another folder)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="BEATs .pt files only (SRC, or --beats): "
                             "torch.load(weights_only=False) (trusted files only)")
    args = parser.parse_args(argv)
    if args.haaqinet and args.allow_pickle and args.beats is None:
        parser.error("--allow-pickle is for BEATs files; HAAQI-Net files load without it")
    if not args.haaqinet and (args.beats_config or args.beats or args.num_heads != 16):
        parser.error("--beats, --beats-config and --num-heads go with --haaqinet")
    if args.beats and args.beats_config:
        parser.error("--beats carries its own config; drop --beats-config")

    def job() -> int:
        if args.haaqinet:
            from haaqi_jax.convert.haaqinet_torch import convert_haaqinet, read_beats_config
            beats_config = (None if args.beats_config is None
                            else read_beats_config(args.beats_config))
            out = convert_haaqinet(args.src, args.out_dir, beats_config=beats_config,
                                   beats_checkpoint=args.beats, num_heads=args.num_heads,
                                   overwrite=args.overwrite, allow_pickle=args.allow_pickle)
        else:
            from haaqi_jax.convert.beats_torch import convert_beats_checkpoint
            out = convert_beats_checkpoint(args.src, args.out_dir, overwrite=args.overwrite,
                                           allow_pickle=args.allow_pickle)
        print(f"wrote {out}: {_summary(out)}")
        return 0

    from haaqi_jax.cli import run_guarded
    return run_guarded("convert_weights.py", job, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
