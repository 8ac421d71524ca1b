"""The MSA model: config, layers, document encoding, sparse prefill/decode, memory interface."""

from transformers import AutoConfig, AutoModelForCausalLM

from msa_cluster.model.config import MemoryConfig, MSAConfig
from msa_cluster.model.context import SparseContext
from msa_cluster.model.memory import InProcessMemory, MemoryBackend, MemorySnapshot
from msa_cluster.model.modeling import MSAForCausalLM, PrefillOutput

AutoConfig.register("msa", MSAConfig, exist_ok=True)
AutoModelForCausalLM.register(MSAConfig, MSAForCausalLM, exist_ok=True)

__all__ = [
    "InProcessMemory",
    "MemoryBackend",
    "MemoryConfig",
    "MemorySnapshot",
    "MSAConfig",
    "MSAForCausalLM",
    "PrefillOutput",
    "SparseContext",
]
