"""The sync engine: local manifests, remote state, batched transfer, guarded deletes, sync-back."""
