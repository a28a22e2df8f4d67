"""imsys: the background-processing service of an ISP management system."""

__version__ = "0.1.0"
