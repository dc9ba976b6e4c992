"""Small utilities both halves (the controller and the local metro) may use: nothing here
imports anything of `reconciler` but `errors`."""
