"""dl2ls: the Dataloop -> Label Studio bridge."""

__version__ = "0.1.0"
