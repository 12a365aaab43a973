"""mammofl: federated, differentially private mammography classification."""

__version__ = "0.1.0"
