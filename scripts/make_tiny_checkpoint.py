"""Regenerate the bundled tiny random checkpoint (deterministic: same bytes every run)."""

import argparse

from msa_cluster.model.tiny import bundled_checkpoint, write_tiny_random

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(bundled_checkpoint()), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(write_tiny_random(args.out, seed=args.seed))
