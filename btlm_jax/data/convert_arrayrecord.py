"""Convert SlimPajama-style shards to ArrayRecord, Grain's random-access format: ``python -m
btlm_jax.data.convert_arrayrecord --input=GLOB --output=DIR``.

Every ``.jsonl.zst`` / ``.jsonl`` file the glob(s) match (comma-separated) becomes one
``.array_record`` file under ``--output``, at its path relative to the files' common directory
(``train/chunk1/example_train_0.jsonl.zst`` -> ``DIR/chunk1/example_train_0.array_record``),
one record per document: the JSON line as it was (``{"text", "meta": {...}}``), so sources and
fields are unchanged. Records are written with ``group_size:1`` (what Grain's
``ArrayRecordDataSource`` needs for fast random access), each file atomically. A bad line fails
naming the file and line (``--on_error=skip`` skips and counts it); an existing output file is
never overwritten.

Train on the result like on any shards: ``--config.data.train='DIR/**/*.array_record'``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start

_INPUT = flags.DEFINE_string("input", None, "Shards to convert: .jsonl.zst/.jsonl glob(s), "
                             "comma-separated, quoted.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (created if missing).")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                              "A bad line: stop naming it, or skip and count it.")
errors.define_verbose_flag()


def targets(spec: str, output: str) -> list[tuple[str, Path]]:
    """(input file, output file) for every .jsonl(.zst) file ``spec`` matches."""
    from btlm_jax.data.slimpajama import DataError, _kind, expand_globs

    files = []
    for label, path in expand_globs(spec, "--input"):
        if label:
            raise DataError(f"--input={spec!r}: a label ({label}=) belongs to data.train, not to "
                            "the conversion; drop it")
        if _kind(path) not in ("zst", "jsonl"):
            raise DataError(f"--input={spec!r}: {path} is not .jsonl.zst or .jsonl")
        files.append(os.path.abspath(path))
    root = os.path.commonpath([os.path.dirname(p) for p in files])
    out = []
    for p in files:
        rel = os.path.relpath(p, root)
        for suffix in (".jsonl.zst", ".json.zst", ".jsonl", ".json"):
            if rel.endswith(suffix):
                rel = rel[:-len(suffix)]
                break
        out.append((p, Path(output) / (rel + ".array_record")))
    return out


def convert_file(src: str, dst: Path, on_error: str = "raise") -> tuple[int, int]:
    """Writes the documents of ``src`` to the new ArrayRecord file ``dst`` (atomically);
    returns (documents written, bad lines skipped)."""
    from array_record.python import array_record_module

    from btlm_jax.data.slimpajama import DataError, iter_lines, parse_record

    if dst.exists():
        raise DataError(f"{dst} exists; delete it or choose another --output")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".array_record", dir=dst.parent)
    os.close(fd)
    written = skipped = 0
    try:
        w = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        try:
            for lineno, line in iter_lines(src):
                if not line.strip():
                    continue
                try:
                    parse_record(f"{src}:{lineno}", line)
                except DataError:
                    if on_error != "skip":
                        raise
                    skipped += 1
                    continue
                w.write(line)
                written += 1
        finally:
            w.close()
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return written, skipped


def convert(spec: str, output: str, on_error: str = "raise", log=print) -> dict:
    """Converts every file ``spec`` matches into ``output``; returns the totals."""
    jobs = targets(spec, output)
    docs = skipped = 0
    for src, dst in jobs:
        n, bad = convert_file(src, dst, on_error)
        docs, skipped = docs + n, skipped + bad
        log(f"{src} -> {dst}: {n} documents" + (f", {bad} bad lines skipped" if bad else ""))
    return {"files": len(jobs), "documents": docs, "skipped": skipped}


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv, distributed=False)
    out = convert(_INPUT.value, _OUTPUT.value, _ON_ERROR.value)
    print(f"wrote {out['files']} ArrayRecord file(s), {out['documents']} documents, to "
          f"{_OUTPUT.value}" + (f" ({out['skipped']} bad lines skipped)" if out["skipped"] else ""))


def run():
    run_app(main, "input", "output", prog="python -m btlm_jax.data.convert_arrayrecord")


if __name__ == "__main__":
    run()
