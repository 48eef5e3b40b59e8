"""
`--workers N`: one supervising process and N workers that all serve
every port.

`supervisor` (the process twistd runs: starts, restarts and signals the
workers, relays their logs, sums their traffic), `sockets` (the
listening sockets it opens, one per worker with SO_REUSEPORT, handed to
them), `worker` (``python -m ssx.workers.worker``: one worker's entry),
`control` (the lines they exchange: a hello, manager requests, `stat:`
reports, reloads), `manager` (the manager API answered by the supervisor),
`reload` (SIGHUP: the file checked by the supervisor, then reloaded by
every worker), `metrics` (``--metrics``: the supervisor's /metrics, the
sums of what each worker serves on a private Unix socket).
"""
