#!/usr/bin/env python
"""Run a command on its own GPU: `python scripts/with_gpu_slot.py [options] -- cmd args...`.

Takes a free GPU slot (ttdl.core.gpu_slots), then execs the command with
CUDA_VISIBLE_DEVICES (and TTDL_GPU_SLOT, TTDL_DESCRIBER_BASE_URL when
TTDL_DESCRIBER_URLS is set) for that slot. With no GPU the command runs on the
CPU. The slot is freed when the command exits, however it exits.

With `--job-lock KEY` (the workflow passes the job's log path) the command also
holds the job's own lock: a second copy of the job waits for the first to end
(see ttdl.core.gpu_slots).
"""
import argparse
import sys

from ttdl.core.gpu_slots import DEFAULT_LOCK_DIR, ENV_LOCK_DIR, JOB_LOCK_DIR, exec_with_slot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock-dir", help=f"lock folder (default ${ENV_LOCK_DIR} or {DEFAULT_LOCK_DIR})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for a free slot (default: wait as long as it takes)")
    parser.add_argument("--job-lock", metavar="KEY",
                        help="hold the lock of job KEY (a relative path) while the command runs; wait while "
                             "another process holds it")
    parser.add_argument("--job-lock-dir", default=JOB_LOCK_DIR, help=f"job lock folder (default {JOB_LOCK_DIR})")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    try:
        exec_with_slot(cmd, job_key=args.job_lock, job_lock_dir=args.job_lock_dir, lock_dir=args.lock_dir,
                       timeout=args.timeout)
    except (TimeoutError, ValueError) as exc:
        sys.exit(f"with_gpu_slot: {exc}")
    except FileNotFoundError as exc:
        sys.exit(f"with_gpu_slot: cannot run {cmd[0]!r}: {exc}")


if __name__ == "__main__":
    main()
