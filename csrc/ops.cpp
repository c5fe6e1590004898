// torch binding of the CUDA C++ kernels in csrc/ (built as vinekernels._C by setup.py, or JIT
// compiled by vinekernels/_ext.py). Validation here is a backstop: vinekernels/sampling.py checks
// the same things first and raises ValueError with more context.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <tuple>

#include "sampling.h"

namespace {

void check_param(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                 const at::Tensor& logits) {
  TORCH_CHECK_VALUE(t.device() == logits.device(), name, " must be on ", logits.device(),
                    ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must have shape [", rows,
                    "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return VK_FLOAT32;
    case at::kHalf:
      return VK_FLOAT16;
    case at::kBFloat16:
      return VK_BFLOAT16;
    default:
      TORCH_CHECK_VALUE(false, "logits must be float32, float16 or bfloat16, got ", t);
  }
  return -1;
}

std::tuple<at::Tensor, at::Tensor> sample_tokens(const at::Tensor& logits,
                                                 const at::Tensor& temperature,
                                                 const at::Tensor& top_k,
                                                 const at::Tensor& top_p, const at::Tensor& seeds,
                                                 const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(logits.is_cuda(), "logits must be a CUDA tensor");
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [B, V], got ", logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0, "logits must have at least one vocabulary entry");
  TORCH_CHECK_VALUE(logits.stride(1) == 1, "logits rows must be contiguous");
  const int dtype = dtype_code(logits.scalar_type());
  const int64_t rows = logits.size(0);
  check_param(temperature, "temperature", at::kFloat, rows, logits);
  check_param(top_k, "top_k", at::kInt, rows, logits);
  check_param(top_p, "top_p", at::kFloat, rows, logits);
  check_param(seeds, "seeds", at::kLong, rows, logits);
  check_param(offsets, "offsets", at::kLong, rows, logits);

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {tokens, logprobs};
  const int err = vk_sample_tokens(
      logits.data_ptr(), dtype, rows, logits.size(1), logits.stride(0),
      temperature.data_ptr<float>(), top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
      seeds.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), tokens.data_ptr<int64_t>(),
      logprobs.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "vinekernels sample_tokens launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {tokens, logprobs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vinekernels CUDA C++ kernels";
  m.def("sample_tokens", &sample_tokens,
        "Fused temperature / top-k / top-p sampling; returns (tokens int64, logprobs float32)",
        pybind11::arg("logits"), pybind11::arg("temperature"), pybind11::arg("top_k"),
        pybind11::arg("top_p"), pybind11::arg("seeds"), pybind11::arg("offsets"));
}
