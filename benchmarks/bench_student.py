"""Inference time of distillBEATs vs BEATs at the released sizes, per 10 s clip (batch 1).

    python benchmarks/bench_student.py [--seconds 10] [--repeats 5] [--layers 0 1 2]

Random weights in the released shapes (timing does not depend on the values): a HAAQI-Net
with BEATs_iter3+ (12 layers, 90,311,792 encoder parameters) and the student built from it by
`student_from_teacher` (3 layers, 21,802,812). Prints seconds per clip and the student/teacher
ratios for the encoders alone and for whole HAAQI-Nets (encoder + head). Target: <= 0.25.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shared-position-bias", action="store_true",
                        help="one relative-position table for all student layers")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from haaqi_jax import distill
    from haaqi_jax.model import HAAQINet, HAAQINetConfig
    from ml_collections import ConfigDict

    teacher = HAAQINet.init_random(HAAQINetConfig(), seed=0)
    dcfg = ConfigDict({"student_layers": tuple(args.layers),
                       "shared_position_bias": bool(args.shared_position_bias),
                       "feature_mode": "last", "head_init": "teacher",
                       "target_layers": (6, 9, 12), "head_kind": "independent"})
    student, _ = distill.init_student(teacher, dcfg, seed=0)
    counts = distill.param_counts(teacher, student)
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
          f"clip {args.seconds:g} s, batch 1, median of {args.repeats}")
    print(f"encoder parameters: teacher {counts['teacher_encoder']:,}, student "
          f"{counts['student_encoder']:,} ({100 * counts['encoder_reduction']:.2f} % fewer)")
    t = distill.inference_seconds(teacher, args.seconds, args.repeats)
    s = distill.inference_seconds(student, args.seconds, args.repeats)
    for part in ("encoder", "model"):
        print(f"{part:<8} teacher {t[part]:.4f} s  student {s[part]:.4f} s  "
              f"ratio {s[part] / t[part]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
