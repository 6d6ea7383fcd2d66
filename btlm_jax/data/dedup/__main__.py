"""``python -m btlm_jax.data.dedup``: the command-line interface."""

from __future__ import annotations

import argparse
import json
import sys

from btlm_jax import errors

from .io import DedupInputError  # noqa: F401  (a user error: errors.report prints it as one line)
from .pipeline import DedupConfig, run_dedup


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``error: ...`` line (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = DedupConfig(inputs=[], output="")
    p = _Parser(
        prog="python -m btlm_jax.data.dedup",
        description="SlimPajama-style near-duplicate removal (NFC, length filter, MinHash-LSH, "
        "connected components), locally or on Ray.",
    )
    p.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="input shards (.jsonl or .jsonl.zst); a glob, quoted; may be repeated")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--mode", choices=["global", "local"], default=d.mode,
                   help="global: one index over all sources; local: one per source")
    p.add_argument("--engine", choices=["local", "ray"], default=d.engine)
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="Ray cluster address (e.g. auto or ray://head:10001); default starts Ray locally")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="local: processes; ray without --ray-address: CPUs for the local Ray")
    g = p.add_argument_group("recipe (SlimPajama defaults)")
    g.add_argument("--num-perm", type=int, default=d.num_perm)
    g.add_argument("--ngram", type=int, default=d.ngram, help="shingle size")
    g.add_argument("--ngram-unit", choices=["char", "word"], default=d.ngram_unit)
    g.add_argument("--bands", type=int, default=d.bands)
    g.add_argument("--rows", type=int, default=d.rows)
    g.add_argument("--threshold", type=float, default=None,
                   help="Jaccard threshold; chooses (bands, rows) minimising false positives + negatives")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the hash permutations")
    g.add_argument("--min-length", type=int, default=d.min_length,
                   help="drop documents whose normalised text is shorter (characters)")
    g.add_argument("--punctuation", choices=["ascii", "unicode"], default=d.punctuation,
                   help="punctuation stripped before filtering and hashing")
    g.add_argument("--holdout", action="append", default=[], metavar="GLOB",
                   help="holdout shards: drop training documents whose normalised text has the same SHA-256")
    p.add_argument("--on-bad-input", choices=["fail", "skip"], default=d.on_bad_input,
                   help="invalid JSON, missing/empty/non-UTF-8 text: stop with file:line, or count and skip")
    p.add_argument("--partitions", type=int, default=d.partitions,
                   help="partitions per band; LSH memory is about 24 bytes x docs / partitions")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="documents per MinHash batch")
    p.add_argument("--zstd-level", type=int, default=d.zstd_level)
    p.add_argument("--work-dir", default=None, help="scratch space (default OUTPUT/.dedup_work); "
                   "on a cluster it must be shared by all nodes")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch files")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true",
                   help="on an input, argument or file-system error, print the traceback too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = DedupConfig(
        inputs=args.input, output=args.output, mode=args.mode, engine=args.engine,
        ray_address=args.ray_address, workers=args.workers, num_perm=args.num_perm,
        ngram=args.ngram, ngram_unit=args.ngram_unit, bands=args.bands, rows=args.rows,
        threshold=args.threshold, seed=args.seed, min_length=args.min_length,
        punctuation=args.punctuation, holdout=args.holdout, on_bad_input=args.on_bad_input,
        partitions=args.partitions, batch_size=args.batch_size, zstd_level=args.zstd_level,
        work_dir=args.work_dir, keep_work=args.keep_work, overwrite=args.overwrite,
        progress=not args.quiet,
    )
    try:
        stats = run_dedup(cfg)
    except Exception as exc:  # noqa: BLE001 - the user's files, flags or disk: one line (shared)
        if not errors.report(exc, verbose_=args.verbose):
            raise
        return 2
    t = stats["total"]
    print(json.dumps({
        "documents_in": t["input"]["documents"], "short": t["short"]["documents"],
        "bad_input": t["bad_input"]["documents"], "contaminated": t["contaminated"]["documents"],
        "duplicates": t["duplicates"]["documents"], "kept": t["kept"]["documents"],
        "bytes_removed_fraction": round(1 - t["kept"]["bytes"] / max(t["input"]["bytes"], 1), 4),
    }))
    return 0


def console():
    sys.exit(main())


if __name__ == "__main__":
    console()
