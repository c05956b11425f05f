import pytest
import torch

# CUDA cases run the same table on the GPU; they skip where no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        import torch_vjp

        assert torch_vjp.has_kernel("softmax", "cuda"), "a GPU is present but torch_vjp was built without CUDA kernels"
    return request.param
