"""A simulated NVML library: a config-driven fake GPU host standing in under pynvml."""
