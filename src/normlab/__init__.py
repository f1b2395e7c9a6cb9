"""normlab: from-scratch normalization layers, CIFAR-style ResNets, and studies that compare them."""

__version__ = "0.1.0"
