"""The user's session specs: models, loading from files, and the parsers they use."""
