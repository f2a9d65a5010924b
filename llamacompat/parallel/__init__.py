"""Parallel mode: llama.rn's ``context.parallel`` (``api``), its request queue (``pool``), and what a core
offers for it (``slots``). The llama_cpp backend batches its slots in ``adapters.llama_cpp_batch``."""

from .api import Parallel
from .pool import MAX_QUEUED, ParallelRequest, Pool, Subscription
from .slots import CoreSlots, Progress, Slots

__all__ = ["Parallel", "ParallelRequest", "Pool", "Subscription", "Slots", "Progress", "CoreSlots", "MAX_QUEUED"]
