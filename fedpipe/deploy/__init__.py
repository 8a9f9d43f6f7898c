"""Deployment on Flower's SuperLink/SuperNode: the coordinator and the device side."""
