"""Method options tuned for the toy world's categories (shape, colour, background): data, read by the erase
context (``methods.base``) through ``prompts.method_preset``. Tuned on the toy benchmark
(``pure_fast/evaluate/toy_bench.py``); keyword options a caller passes override them.
"""
from __future__ import annotations

# PURE thresholds, measured on the toy world (retain = the two following members; the benchmark's quick
# settings at 6 DDIM steps). H-mean (target anchor/held-out, quality):
#   (forget, retain)  red               star              stripes           blue
#   (0.95, 0.95)      0.00 (1.0/1.0)    0.35 (1.0/0.75)   -                 -
#   (0.99, 0.8)       0.10 (q 0.03)     0.82 (q 0.57)     0.96              0.00 (q 0.25)
#   (0.99, 0.9)       0.65 (1.0/0.25)   0.94 (0.0/0.25)   0.97 (0.0/0.0)    0.00 (1.0/1.0)   <- chosen
#   (0.999, 0.8)      0.17 (q 0.05)     0.63 (q 0.31)     0.94              -
# (0.999, 0.5) erases most (red 0.33/0.0, star 0/0) but ruins the other attributes and quality
# (red: other-attribute accuracy 0.62, quality 0.0); forget 1.0 takes the neighbours with it.
PURE_THRESHOLDS = {"forget_threshold": 0.99, "retain_threshold": 0.9}

# SPACE: the toy model's 384-wide K/V weights do not survive the paper's 85 % zeros. Measured with the toy
# benchmark's quick settings (each of square, triangle, star, red, green, blue, stripes, checker, dots erased
# alone, retain = the two following members), mean quality term / mean H-mean: target 0.2 -> 0.89 / 0.44;
# 0.35 -> 0.28 / 0.31; 0.5 -> 0.20 / 0.27; 0.85 -> 0.00 / 0.00.
SPACE_TARGET_SPARSITY = 0.2

# method -> {option: value} for every toy category
TOY_PRESETS: dict[str, dict] = {
    "pure": dict(PURE_THRESHOLDS),
    "space": {"target_sparsity": SPACE_TARGET_SPARSITY},
}
