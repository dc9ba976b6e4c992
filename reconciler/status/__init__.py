"""The status file: its models (`schema`) and how it is read, written and locked (`journal`)."""
