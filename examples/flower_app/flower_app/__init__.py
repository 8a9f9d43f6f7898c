"""flower_app: a Flower / PyTorch app, with fedpipe added."""
