"""Helpers shared by the test folders. Fixtures stay in each folder's conftest.py; anything a
test imports by name lives here."""
