"""FLOPs and bytes moved by LLM inference, their cross-checks, and GPU peak figures for MFU/MBU.

Three ways to count, best first (the `method` of a `flops_model` artifact):

- ``analytic``: closed-form counts from the architecture (`ArchitectureSpec`), for the model types
  whose layer structure is written out below (llama, mistral, qwen2, qwen3, gpt2). Cross-checked
  against `torch.utils.flop_counter.FlopCounterMode` on a real forward of the same model and, where
  the model is small enough for a CPU forward, against calflops.
- ``flop_counter``: for causal LMs that transformers can build but whose structure is not written out
  here, a cost model fitted from FlopCounterMode counts of real forwards (see `fit_cost_model`).
- ``parameter_estimate``: 2 x parameters x tokens when nothing else works.

What is counted (the same for all three, so that the numbers compose):
- Matmul FLOPs only (2 per multiply-add): every weight matrix, including the lm_head, and the two
  attention matmuls (Q K^T and A V). Norms, activations, softmax, rotary embeddings and bias adds are
  left out; they are a fraction of a percent for real models and are not what GPU peak figures count.
- Prefill attention is the full seq x seq square, as eager and SDPA-math kernels compute it (the
  causal mask is applied after the matmul). Flash-style kernels skip the masked half, so they execute
  fewer attention FLOPs than counted here; this estimate is the model's dense work, not a kernel trace.
- Generation uses a KV cache: the prompt is one forward (prefill) that also yields the first output
  token; each later output token t = 1..output_tokens-1 is one single-token forward (decode step)
  whose attention spans input_tokens + t keys.
- The lm_head runs on the last prompt position only in prefill: transformers' `generate` sets
  `logits_to_keep=1` whenever the model's forward accepts it (generation/utils.py, checked in
  transformers 5.19) and vLLM computes logits only for the positions it samples from.
- Useful FLOPs: padding tokens are excluded, because the requests table holds unpadded counts.

One module per concept: `analytic` (cost model, architecture, closed-form counts), `counted`
(FlopCounterMode, calflops, the fitted cost model, cross-check records), `stage` (the cost model
per model and dtype, and its application to a cycle's requests), `peaks` (GPU peak figures, MFU,
MBU). The names other stages and the tests use are re-exported here.
"""

from llm_energy.flops.analytic import (
    DTYPE_BYTES,
    SUPPORTED_MODEL_TYPES,
    ArchitectureSpec,
    CostModel,
    analytic_decode_step_flops,
    analytic_flops,
    analytic_forward_flops,
    bytes_per_param,
    parameter_estimate_flops,
)
from llm_energy.flops.counted import (
    calflops_forward_flops,
    fit_cost_model,
    load_model_config,
    measured_decode_step_flops,
    measured_forward_flops,
)
from llm_energy.flops.peaks import PEAK_FIGURES, mbu, mfu, peak_figures
from llm_energy.flops.stage import cycle_flops, estimate_model_flops

__all__ = [
    "DTYPE_BYTES",
    "PEAK_FIGURES",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureSpec",
    "CostModel",
    "analytic_decode_step_flops",
    "analytic_flops",
    "analytic_forward_flops",
    "bytes_per_param",
    "calflops_forward_flops",
    "cycle_flops",
    "estimate_model_flops",
    "fit_cost_model",
    "load_model_config",
    "mbu",
    "measured_decode_step_flops",
    "measured_forward_flops",
    "mfu",
    "parameter_estimate_flops",
    "peak_figures",
]
