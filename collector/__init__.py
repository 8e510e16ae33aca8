"""The creditmeter collector: verifies, stores and prices the usage records of many agents."""
