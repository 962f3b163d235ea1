"""Sessions on Ray actors (the ``cluster`` extra): ``SessionPool`` (docs/cluster.md).
Ray itself is imported when a pool starts."""
from max_jupyter.pool.job import PoolJob, Retry
from max_jupyter.pool.pool import PoolResults, SessionPool

__all__ = ["SessionPool", "PoolResults", "PoolJob", "Retry"]
