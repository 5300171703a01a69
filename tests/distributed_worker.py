"""Run several ``refdecoder`` command lines in one ``torchrun`` launch (tests/test_distributed_cli.py).

The process group is created here, once, so the commands find it and leave it alone; one launch then costs one
interpreter start-up and one rendezvous instead of one per command. Exits with the largest exit code.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py '[["encode", ...], [...]]'
"""

from __future__ import annotations

import json
import sys

import torch

from refdecoder.cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    codes = [main(argv) for argv in json.loads(sys.argv[1])]
    torch.distributed.destroy_process_group()
    sys.exit(max(codes))
