"""torchrun as `retro` starts it for `[launch]` (`python -m retrocli.torchrun ARGS`, ARGS as torchrun's): torch's own
launcher, whose failure report is left out when the first rank to fail exited 2. A rank that meets a problem the user
can fix says it in one line and exits 2, as a one-process run does; torchrun would add its traceback and exit 1.
Any other failure is reported by torchrun as usual."""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

USER_ERROR = 2  # retrocli.cli's exit code for a UserError


def launch(argv: list[str]) -> int:
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        if e.get_first_failure()[1].exitcode == USER_ERROR:  # the ranks torchrun stopped after it died of it
            return USER_ERROR
        raise  # torchrun's own report of the failed ranks
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
