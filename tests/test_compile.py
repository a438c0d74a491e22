"""Regional compilation: which blocks are compiled, the CUDA-only default, and compiled = eager numerics (fp32)."""

import copy

import pytest
import torch

from models.compile import compile_blocks, compile_enabled, is_compiled, transformer_blocks
from models.mae import MaskedAutoencoder


def _tiny(mask_type="random", depth=2):
    torch.manual_seed(0)
    return MaskedAutoencoder(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, decoder_embed_dim=16,
                             decoder_depth=1, decoder_num_heads=2, mask_type=mask_type, norm_pix_loss=True)


def test_compile_enabled_default_is_cuda_only():
    assert compile_enabled(None, "cuda") and compile_enabled(None, torch.device("cuda:1"))
    assert not compile_enabled(None, "cpu")
    assert compile_enabled(True, "cpu") and not compile_enabled(False, "cuda")


def test_compile_blocks_compiles_encoder_and_decoder_blocks():
    model = _tiny("block")
    blocks = transformer_blocks(model)
    assert len(blocks) == 3  # 2 encoder + 1 decoder
    assert compile_blocks(model, backend="eager") == 3
    assert all(is_compiled(b) for b in blocks) and not is_compiled(model)
    assert set(model.state_dict()) == set(_tiny("block").state_dict())  # checkpoints keep their keys
    copy.deepcopy(model)  # EMA / evaluation copies still work
    with pytest.raises(ValueError, match="no transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("mask_type", ["random", "block"])
def test_regionally_compiled_step_matches_eager(mask_type):
    """Loss and every gradient of one step equal eager's (aot_eager: dynamo capture + AOT autograd, no codegen,
    so this runs in seconds on CPU; inductor's numerics are checked below on the forward)."""
    eager = _tiny(mask_type)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled, backend="aot_eager")
    x = torch.randn(4, 3, 16, 16)
    noise = eager.make_noise(4, generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (eager, compiled):
        loss, _, _ = model(x, noise=noise)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_inductor_compiled_loss_matches_eager_fp32():
    eager = _tiny(depth=1)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)  # default backend: inductor (C++ code generation on CPU)
    x = torch.randn(4, 3, 16, 16)
    noise = torch.rand(4, 16)
    with torch.no_grad():
        want, _, _ = eager(x, noise=noise)
        got, _, _ = compiled(x, noise=noise)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
