"""The agent: the main process inside every local-metro sandbox.

It runs under the host's `/usr/bin/python3` inside bubblewrap, so it uses the standard library
only, and this package is bound read-only into the sandbox as `/run/ukc-host/agent` (its
modules import each other relatively; `__main__` is the entry point). It plays the part of the
sandbox image of the original workflow plus the UKC sandbox plugin:

* writes a fresh boot id to `/run/ukc/boot_id` (`boot`);
* installs env `PUBKEY` as the authorized key and runs `sshd` on 127.0.0.1:2222 (`boot`);
* serves the exec API (`POST /exec`) on 127.0.0.1:8080 (`execapi`);
* serves the sandbox plugin API on a unix socket inherited from the runtime (`plugin`,
  `plugin_files`, `commands`);
* relays byte streams: a host client connects to the inherited relay socket, sends `PORT\\n`,
  gets `OK\\n` once the agent reached 127.0.0.1:PORT inside the sandbox's network namespace,
  then bytes flow both ways; this is how the TLS edge reaches sshd and the exec API (`relay`);
* reports `ready <boot id>` on the inherited status fd once sshd accepts.

Everything the runtime needs is passed as inherited file descriptors, so the sandbox never gets
write access to any host path except `/workspace`. Everything the agent sends back to the host
is untrusted there.
"""
