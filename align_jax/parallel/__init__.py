"""Devices and processes: the mesh and sharding rules, multi-process start, preemption, lost peers."""
