#!/usr/bin/env python
"""Run a command on its own GPU: `python scripts/with_gpu_slot.py [options] -- cmd args...`.

Takes a free GPU slot (ttdl.core.gpu_slots), then execs the command with
CUDA_VISIBLE_DEVICES (and TTDL_GPU_SLOT, TTDL_DESCRIBER_BASE_URL when
TTDL_DESCRIBER_URLS is set) for that slot. With no GPU the command runs on the
CPU. The slot is freed when the command exits, however it exits.
"""
import argparse
import sys

from ttdl.core.gpu_slots import DEFAULT_LOCK_DIR, ENV_LOCK_DIR, exec_with_slot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock-dir", help=f"lock folder (default ${ENV_LOCK_DIR} or {DEFAULT_LOCK_DIR})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for a free slot (default: wait as long as it takes)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("give the command after --")
    try:
        exec_with_slot(cmd, lock_dir=args.lock_dir, timeout=args.timeout)
    except TimeoutError as exc:
        sys.exit(f"with_gpu_slot: {exc}")
    except FileNotFoundError as exc:
        sys.exit(f"with_gpu_slot: cannot run {cmd[0]!r}: {exc}")


if __name__ == "__main__":
    main()
