"""The usage writer's child, failing once right after it commits a batch.

Run as `python -m tests.proxy.faulty_writer MODE MARKER`. The first child to find no MARKER
file makes it and, having committed its first batch, either dies before answering
(MODE `die`) or answers that the batch failed (MODE `fail`, as when a connection drops
while the commit goes through). Children started after it, and its later batches,
behave normally.
"""

import os
import sys

from app.proxy import writer

mode, marker = sys.argv[1], sys.argv[2]
answer = writer._answer


def _fail_once(answers, batch_id, error, refused=False):
    if not os.path.exists(marker):
        open(marker, "w").close()
        if mode == "die":
            os._exit(1)  # committed, not answered
        error = "OperationalError('the connection was lost during COMMIT')"
    answer(answers, batch_id, error, refused)


writer._answer = _fail_once
writer.main()
