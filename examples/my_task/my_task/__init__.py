"""An example fedpipe task package (see task.py)."""
