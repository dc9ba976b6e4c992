"""The local metro: an offline emulator of one UKC metro that runs real bubblewrap sandboxes.

`daemon` finds, starts and stops the daemon process (`serve`), which composes the platform API
(`api`) over the instances and their lifecycle (`state`), the sandbox runtime (`sandbox`), the
TLS edge (`edge`, `peercred`), its certificate authority (`ca`) and the fault knobs (`faults`).
Of the rest of `reconciler` it uses only `errors` and `_util`.
"""
