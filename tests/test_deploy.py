"""Deployment targets for minimized programs with dynamic dims, on CPU: ExecuTorch, AOTInductor, ONNX Runtime.
Each runs the minimized program at two shapes and compares with the original eager model."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import fxprune as fp
from test_dynamic import at, logits, planted
from test_minimize_module import vit_with_a_dead_stream_channel
from test_norms import poolformer_with_dead_stream_channels

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

TOL = 1e-4  # float32 programs; the compilers reorder float32 arithmetic


def program(name: str) -> tuple[torch.nn.Module, torch.Tensor, tuple, torch.export.ExportedProgram]:
    model, (x,), _ = planted(name)
    model, x = model.float(), (x.float() if x.is_floating_point() else x)
    ds = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32)},) if x.dtype == torch.long else \
        ({0: Dim("batch", min=1, max=8)},)
    ep = torch.export.export(model, (x,), dynamic_shapes=ds, strict=False)
    return model, x, ds, ep


def close(model: torch.nn.Module, xi: torch.Tensor, out: torch.Tensor) -> bool:
    with torch.no_grad():
        ref = logits(model(xi))
    return out.shape == ref.shape and float((out - ref).abs().max() / ref.abs().max()) <= TOL


@pytest.mark.parametrize("name", ["convnext", "vit"])
def test_executorch_runs_the_minimized_program_at_two_batch_sizes(name):
    pytest.importorskip("executorch", reason="executorch is in the dev extra")
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    model, x, _, ep = program(name)
    small = fp.minimize(ep)
    pte = to_edge_transform_and_lower(small).to_executorch()
    buffer = pte.buffer
    prog = Runtime.get().load_program(buffer)  # the program (and its buffer) must outlive the method: freed first, the
    method = prog.load_method("forward")       # method runs on released memory (a segfault on larger models)
    for b in (1, 5):
        xi = at(x, b)
        assert close(model, xi, method.execute([xi])[0]), b


def test_aotinductor_compiles_the_minimized_program_and_the_untouched_original(tmp_path):
    model, x, _, ep = program("gpt2")
    small = fp.minimize(ep)
    for prog, where in ((small, "small"), (ep, "original")):  # the original after a pass ran on it
        path = torch._inductor.aoti_compile_and_package(prog, package_path=str(tmp_path / f"{where}.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for b, t in ((1, 5), (5, 24)):
            xi = at(x, b, t)
            assert close(model, xi, logits(runner(xi))), (where, b, t)


def test_onnx_runtime_runs_the_minimized_program_with_dynamic_axes(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    model, x, ds, ep = program("gpt2")
    small = fp.minimize(ep)
    onnx_program = torch.onnx.export(small, (x,), dynamic_shapes=ds, dynamo=True)
    onnx_program.save(str(tmp_path / "small.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "small.onnx"))
    for b, t in ((1, 5), (5, 24)):
        xi = at(x, b, t)
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0])
        assert close(model, xi, out), (b, t)


def _logits_module(m: torch.nn.Module) -> torch.nn.Module:
    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).logits

    return Logits(m).eval()


def _executorch_and_onnx(model: torch.nn.Module, small: torch.nn.Module, x: torch.Tensor, tmp_path,
                         wrap=_logits_module) -> None:
    """``small`` (read through ``wrap``: a transformers model's logits) exported with a dynamic batch, lowered to
    ExecuTorch with XNNPACK and to ONNX: both at batch 1 and 7 against the eager ``model``."""
    pytest.importorskip("executorch", reason="executorch is in the dev extra")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ds = ({0: Dim("batch", min=1, max=16)},)
    ep = torch.export.export(wrap(small), (x,), dynamic_shapes=ds, strict=False)
    prog = Runtime.get().load_program(to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
                                      .to_executorch().buffer)
    method = prog.load_method("forward")
    onnx_program = torch.onnx.export(wrap(small), (x,), dynamic_shapes=ds, dynamo=True)
    onnx_program.save(str(tmp_path / "small.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "small.onnx"))
    for b in (1, 7):
        xi = at(x, b)
        assert close(model, xi, method.execute([xi])[0]), b
        assert close(model, xi, torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: xi.numpy()})[0])), b


def test_the_users_class_minimize_module_returns_exports_to_executorch_and_onnx(tmp_path):
    """What a user deploys after the cycle: their own class, smaller (a ViT with CompensatedLayerNorm modules and
    narrower heads), exported by themselves with a dynamic batch, lowered to ExecuTorch with XNNPACK and to ONNX."""
    from fxprune.nn.norm import CompensatedLayerNorm

    model, x = vit_with_a_dead_stream_channel(torch.float32)
    small = fp.minimize_module(model, (x,))
    assert any(isinstance(m, CompensatedLayerNorm) for m in small.modules())
    assert small.vit.layers[0].attention.head_dim == 15
    _executorch_and_onnx(model, small, x, tmp_path)


def test_a_poolformer_with_compensated_group_norms_exports_to_executorch_and_onnx(tmp_path):
    pytest.importorskip("transformers")
    model = poolformer_with_dead_stream_channels(torch.float32)
    x = torch.randn(2, 3, 32, 32)
    small = fp.minimize_module(model, (x,))
    assert any(isinstance(m, fp.nn.CompensatedGroupNorm) for m in small.modules())
    _executorch_and_onnx(model, small, x, tmp_path)

@pytest.mark.parametrize("name", ["generator", "lstm", "autoencoder", "tcn", "norms", "inputs"])
def test_plain_pytorch_models_minimized_in_their_class_export_to_executorch_and_onnx(name, tmp_path):
    """CycleGAN's generator (reflection pads, instance norms, a transposed conv), a two-layer LSTM tagger, a
    Stable-Diffusion-style autoencoder (group norms of two groups, compensated) and a TCN of weight-normed convs
    (still weight norm), a stream through a LayerNorm without weights and a SqueezeBERT-style permuting norm
    (both compensated), and an MLP whose first layer reads 6 of its 10 input features, each minimized as its own class, run in ExecuTorch and ONNX Runtime at batch 1 and 7."""
    from test_plain_models import Autoencoder, Generator, plant, plant_in_groups
    from test_rules import _Recurrent
    from test_saving import planted_norm_stream
    from test_inputs import mlp
    from test_weight_norm import planted_tcn

    model, x = {"generator": lambda: (plant(Generator()).eval(), torch.randn(2, 3, 32, 32)),
                "lstm": lambda: (_Recurrent(torch.nn.LSTM, 2).eval(), torch.randn(2, 7, 5)),
                "autoencoder": lambda: (plant_in_groups(Autoencoder()).eval(), torch.randn(2, 3, 16, 16)),
                "tcn": lambda: (planted_tcn().float(), torch.randn(2, 4, 10)),
                "norms": lambda: (planted_norm_stream().float(), torch.randn(2, 5, 4)),
                "inputs": lambda: (mlp().float(), torch.randn(2, 10))}[name]()
    small = fp.minimize_module(model, (x,))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if name == "autoencoder":
        assert any(isinstance(m, fp.nn.CompensatedGroupNorm) and m.kept_per_group for m in small.modules())
    if name == "norms":
        assert small.norm.weight is None and small.cf.weight.shape == (3,)
    if name == "inputs":
        assert small[0].kept_inputs.numel() == 6
    _executorch_and_onnx(model, small, x, tmp_path, wrap=lambda m: m.eval())
