"""The sandbox runtime: one bubblewrap sandbox per running instance, with the launcher that
starts it and the agent that runs inside it (both standard library only)."""
