"""The local metro's HTTP face: UKC's platform API, the sandbox plugin proxy, admin routes."""
