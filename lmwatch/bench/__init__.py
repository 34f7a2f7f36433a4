"""The decision benchmark: lmwatch's policy against re-implemented baselines.

A corpus of workloads (`corpus`) runs through the simulator's migration model in
virtual time (`runner`), once per (workload, profile, controller). A controller
(`controller`) is whatever decides during a migration: lmwatch's policy
(`lmwatch_controller`) or a re-implementation of another system (`baselines`).
The judge (`judge`) scores each run against its profile, the hindsight bound
(`bound`) says what was possible, and `report` prints the table and the figure.
"""
