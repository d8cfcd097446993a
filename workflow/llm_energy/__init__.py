"""llm_energy: measure what LLM inference costs (energy, throughput, latency, FLOPs)."""

__version__ = "0.1.0"
