// Plain C interface of the fused sampling kernel (csrc/sampling.cu), free of torch headers so the
// kernel compiles with nvcc alone; csrc/ops.cpp binds it to torch.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum VkDtype { VK_FLOAT32 = 0, VK_FLOAT16 = 1, VK_BFLOAT16 = 2 };

// One sampled token per row of `logits` ([num_rows, vocab], element stride 1, row stride
// `row_stride` elements). Per-row parameters: temperature (0 = greedy), top_k (0 = off),
// top_p (1 = off), seeds and offsets (the counter of the random draw). Writes tokens[row]
// (-1 for a row with NaN/+inf logits or only -inf) and logprobs[row] (the processed logprob).
// `stream` is a cudaStream_t. Returns a cudaError_t (0 = success).
int vk_sample_tokens(const void* logits, int dtype, int64_t num_rows, int64_t vocab,
                     int64_t row_stride, const float* temperature, const int32_t* top_k,
                     const float* top_p, const int64_t* seeds, const int64_t* offsets,
                     int64_t* tokens, float* logprobs, void* stream);

#ifdef __cplusplus
}
#endif
