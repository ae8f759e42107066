"""`python -m seg4diff_repro`: the `seg4diff-repro` command as the workflow's jobs run it (workflow/bin).

It hands the job to the fork server, where one runs, before importing the command line's modules: a job that the
server takes costs its client a twentieth of a second.
"""

import sys

from seg4diff_repro.fork_server import run_job

run_job(sys.argv[1:])
