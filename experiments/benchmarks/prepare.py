"""Preparation throughput and peak memory on a generated corpus (nothing downloaded).

Writes ``--mb`` MB of random-word documents as zstd JSON lines shards, then runs
``prepare.prepare_corpus`` on them in a child process per configuration (byte
tokenizer; a SentencePiece model trained on the first shard, with 1 and ``--processes``
workers) and prints MB/s and the peak resident memory of the child and its workers.
The main process's peak is its own (VmHWM); the workers' is ``RUSAGE_CHILDREN``'s, an
upper bound (Linux carries a parent's peak into a child it forks). Peak memory that
stays flat as ``--mb`` grows is what lets a corpus larger than the
machine's memory be prepared; ``--limit_mb`` caps each child's address space (workers
included) below the corpus size to show it.

    python experiments/benchmarks/prepare.py --mb 64 256 [--processes 2]
    python experiments/benchmarks/prepare.py --mb 2048 --limit_mb 1536 --tokenizers byte
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

DOC_WORDS = (50, 2000)  # words per document, uniform
VOCAB_WORDS = 20000  # pseudo-words of 2-9 letters, drawn with Zipf-like frequencies


def _words(rng) -> tuple[np.ndarray, np.ndarray]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(
        ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(VOCAB_WORDS)]
    )
    p = 1.0 / np.arange(1, VOCAB_WORDS + 1)
    return words, p / p.sum()


def write_corpus(root: Path, mb: int, seed: int = 0) -> list[str]:
    """``mb`` MB of documents in 32 MB zstd JSON-lines shards; returns their paths."""
    import zstandard

    rng = np.random.default_rng(seed)
    words, freq = _words(rng)
    files, written, shard = [], 0, 0
    while written < mb * 2**20:
        lines, size = [], 0
        while size < 32 * 2**20 and written + size < mb * 2**20:
            text = " ".join(rng.choice(words, rng.integers(*DOC_WORDS), p=freq))
            lines.append(json.dumps({"text": text}))
            size += len(text) + 1
        path = root / f"shard-{shard:04d}.jsonl.zst"
        path.write_bytes(zstandard.compress("\n".join(lines).encode() + b"\n"))
        files.append(str(path))
        written, shard = written + size, shard + 1
    return files


CHILD = """
import json, resource, sys, time
files, out, tokenizer, processes, limit = json.loads(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from mhc_jax import prepare
start = time.time()
meta = prepare.prepare_corpus(files, out, tokenizer=tokenizer, processes=processes)
wall = time.time() - start
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over the exec)
status = open("/proc/self/status").read()
peak_self = int(status.split("VmHWM:")[1].split()[0]) / 2**10
peak_workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
print(json.dumps(dict(wall=wall, meta=meta["splits"], peak_mb=peak_self,
                      worker_peak_mb=peak_workers)))
"""


def run(files, out, tokenizer, processes, limit_mb) -> dict:
    args = json.dumps([files, out, tokenizer, processes, limit_mb * 2**20])
    done = subprocess.run(
        [sys.executable, "-c", CHILD, args], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--limit_mb", type=int, default=0, help="address-space cap (0: none)")
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "spm"])
    args = parser.parse_args()
    from mhc_jax import data, tokenizers

    cap = f", address space capped at {args.limit_mb} MB" if args.limit_mb else ""
    print(f"# {os.cpu_count()} CPUs{cap}")
    print("| corpus MB | tokenizer | processes | MB/s | tokens | peak RSS MB (main / workers) |")
    for mb in args.mb:
        with tempfile.TemporaryDirectory(prefix="mhc_prepare_bench-") as tmp:
            root = Path(tmp)
            files = write_corpus(root, mb)
            runs = [("byte", 1)] if "byte" in args.tokenizers else []
            if "spm" in args.tokenizers:
                _, docs = data.iter_documents(files[:1])
                spm = tokenizers.train_sentencepiece(
                    (d for _, d in zip(range(2000), docs)), args.vocab, str(root / "spm.model")
                )
                runs += [(spm, 1), (spm, args.processes)]
            for tokenizer, processes in runs:
                out = root / f"out-{len(list(root.glob('out-*')))}"
                r = run(files, str(out), tokenizer, processes, args.limit_mb)
                total_bytes = sum(s["num_bytes"] for s in r["meta"].values())
                tokens = sum(s["num_tokens"] for s in r["meta"].values())
                name = "byte" if tokenizer == "byte" else f"sentencepiece:{args.vocab}"
                print(
                    f"| {mb} | {name} | {processes} | {total_bytes / 2**20 / r['wall']:.1f} "
                    f"| {tokens:,} | {r['peak_mb']:.0f} / {r['worker_peak_mb']:.0f} |",
                    flush=True,
                )
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB)")


if __name__ == "__main__":
    main()
