"""The usage writer's child, dying once right after it commits a batch and before it answers.

Run as `python -m tests.proxy.dying_writer MARKER`: the first child to find no MARKER file
makes it and dies; the children started after it behave normally.
"""

import os
import sys

from app.proxy import writer

marker = sys.argv[1]
answer = writer._answer


def _die_once(answers, batch_id, error):
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # committed, not answered
    answer(answers, batch_id, error)


writer._answer = _die_once
writer.main()
