"""``boxteacher ARGS`` in a process that kills itself with SIGKILL part-way through
writing its K-th part record (tests/training/test_pseudo_label_distributed.py):

    python tests/training/pseudo_label_killer.py K pseudo-label --weights W --data D --output O

Deterministic where a kill from outside is a race: the process dies with K - 1 whole
records in its part file and the first half of the K-th (what a kill -9 during a write
leaves); every process of a torchrun job counts its own records.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from training import pseudo_label
from training.cli import main

KILL_AT = int(sys.argv[1])
_write = pseudo_label.PartWriter.write


def _write_then_die(self: pseudo_label.PartWriter, record: dict) -> None:
    if self.written + 1 == KILL_AT:
        line = json.dumps(record).encode()
        self._file.write(line[: len(line) // 2])
        self._file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    _write(self, record)


pseudo_label.PartWriter.write = _write_then_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
