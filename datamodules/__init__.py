"""roar data: embedded default dataset, shard writers, image-shard and code-shard DataModules."""
from lightning_modules import compat as _compat  # noqa: F401
