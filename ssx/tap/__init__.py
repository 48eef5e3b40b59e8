"""
The twistd entry points: `Options` and `makeService` for each command.

`ssx.tap.server` backs `twistd ssx-server`, `ssx.tap.local` backs
`twistd ssx-local`; `twisted/plugins/ssx_plugins.py` names them.
"""
