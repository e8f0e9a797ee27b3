"""The Flower edge: the only package of fedpeft that imports ``flwr``."""
