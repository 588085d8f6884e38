#!/usr/bin/env python
"""Download and unpack Pascal VOC 2012 trainval (opt-in: `snakemake --cores 1 download_voc`).

Never part of the default run: no rule consumes its output, so only an
explicit request downloads anything. Streams the ~2 GB archive to a .part
file while hashing it, checks the published md5, unpacks it under --dest
(giving {dest}/VOCdevkit/VOC2012, config/voc.yaml's default data.root), checks
the result like rule check_data does, and removes the archive unless
--keep-archive. A mirror: --url or the TTDL_VOC_URL environment variable.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path

from ttdl.core.cli import setup_logging
from ttdl.core.io import write_json
from ttdl.datasets.voc_check import VOC2012_COUNTS, VOC_HOST, VOC_TAR, DataCheckError, check_dataset

OFFICIAL_URL = VOC_HOST + VOC_TAR
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"  # as published with the devkit (and used by torchvision)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """The download or the archive is unusable; the message says which and what to do."""


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, session=None, log=None) -> Path:
    """Stream `url` to `dest` (via dest.part), verifying md5; an existing good `dest` is reused."""
    if dest.is_file() and (md5 is None or md5_file(dest) == md5):
        return dest
    if session is None:
        import requests
        session = requests.Session()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest, done = hashlib.md5(), 0
    try:
        with session.get(url, stream=True, timeout=(30, 300)) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length") or 0)
            with open(part, "wb") as fh:
                for block in response.iter_content(chunk_size=CHUNK):
                    fh.write(block)
                    digest.update(block)
                    done += len(block)
                    if log and done % (256 * CHUNK) < len(block):
                        log.info("%d MiB of %s", done >> 20, f"{total >> 20} MiB" if total else "?")
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"md5 of {url} is {digest.hexdigest()}, expected {md5}: a truncated or different "
                                f"file (try again, or a mirror via --url / TTDL_VOC_URL)")
        os.replace(part, dest)
    except Exception as exc:
        part.unlink(missing_ok=True)
        if isinstance(exc, DownloadError):
            raise
        raise DownloadError(f"cannot download {url}: {exc}. Without internet access, copy {VOC_TAR} here "
                            f"by hand ({dest}) and rerun, or point data.root at an unpacked copy.") from exc
    return dest


def extract(archive: Path, into: Path) -> None:
    """Unpack with tarfile's 'data' filter: no absolute paths, no '..', no device files."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise DownloadError(f"cannot unpack {archive}: {exc}") from exc


def main(argv: list[str] | None = None, session=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TTDL_VOC_URL", OFFICIAL_URL))
    parser.add_argument("--md5", default=VOC_MD5, help="expected md5 of the archive ('' to skip)")
    parser.add_argument("--dest", default="resources", help="unpack here: {dest}/VOCdevkit/VOC2012")
    parser.add_argument("--out", required=True, help="manifest JSON (url, md5, check report), written last")
    parser.add_argument("--keep-archive", action="store_true")
    parser.add_argument("--expect-counts", choices=["voc2012", "any"], default="voc2012")
    args = parser.parse_args(argv)
    log = setup_logging()
    dest = Path(args.dest)
    archive = dest / Path(args.url).name
    try:
        log.info("downloading %s to %s", args.url, archive)
        download(args.url, archive, args.md5 or None, session=session, log=log)
        log.info("unpacking %s", archive)
        extract(archive, dest)
        root = dest / "VOCdevkit" / "VOC2012"
        report = check_dataset(root, expected_counts=VOC2012_COUNTS if args.expect_counts == "voc2012" else None)
    except (DownloadError, DataCheckError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if not args.keep_archive:
        archive.unlink()
    write_json(args.out, {"url": args.url, "md5": args.md5 or None, "root": str(root), "check": report})
    log.info("VOC 2012 is in %s; split sha256 (pin in data.split_sha256): %s", root,
             {s: info["sha256"] for s, info in report["splits"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
