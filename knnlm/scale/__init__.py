"""Scale past one process: sharded builds (in-process or Ray tasks) merged into one datastore, and an index
whose keys are added in parts and whose inverted lists may live on disk.

    build_sharded(corpus, out, BuildConfig(...), ShardConfig(shards=4, engine=Engine.RAY))
"""

from .engines import Engine
from .shards import ShardConfig, build_sharded, plan_shards

__all__ = ["Engine", "ShardConfig", "build_sharded", "plan_shards"]
