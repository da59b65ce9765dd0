"""Private APIs of dependencies that lifecycle relies on, one test each, named after the API: an upgrade that
changes one fails here with its name, before the code that uses it fails in a less telling way.

| API | used in | relied on for |
|---|---|---|
| `hydra._internal.utils._locate` | config.py `_import` | importing a `_target_` at start-up without building it |
| `lightning.fabric.strategies.fsdp._is_sharded_checkpoint` | checkpointing.py, stages/runner.py | FSDP checkpoint folders |
| `lightning.fabric.utilities.load._METADATA_FILENAME` | checkpointing.py, distributed.py | the metadata file in such a folder |
| `Trainer._logger_connector.should_update_logs` | stages/optim.py `log_step` | logging only on the steps the loggers write |
| `torch._subclasses.fake_tensor.FakeTensorMode` | stages/pretrain.py `denoiser_flops` | counting FLOPs without computing |
| `torch.nn.Module._compiled_call_impl` | stages/pretrain.py `denoiser_flops` | counting a compiled denoiser eagerly |
| `torch.nn.modules.batchnorm._NormBase` | models/memory.py `NORM_LAYERS` | keeping norm layers in fp32 |
| `torch._foreach_lerp_` | callbacks/ema.py | the EMA update in one call |
| diffusers `ModelMixin._supports_gradient_checkpointing` | models/memory.py | which denoisers checkpoint natively |
| ray `ray.init(_temp_dir=...)` | curation/engine.py `ray_session` | the local Ray's session folder in the run directory |
| imwatermark `EmbedDwtDctSvd`: `_block`, `_watermarks`, `_wmLen`, `_scales`, hooks | outputs/watermark.py | a batched coder |
"""

import numpy as np
import pytest
import torch
from torch import nn


def test_hydra_internal_utils_locate():
    from hydra._internal.utils import _locate

    from lifecycle.rewards.synthetic import ColourReward

    assert _locate("lifecycle.rewards.synthetic.ColourReward") is ColourReward  # a class, not an instance
    assert _locate("os.path.join") is __import__("os").path.join
    for bad in ("no.such.Reward", "lifecycle.rewards.synthetic.NoSuchReward"):
        with pytest.raises(ImportError):  # config.py reports any failure as a bad dotted path, with its cause
            _locate(bad)


def test_lightning_fabric_strategies_fsdp_is_sharded_checkpoint(tmp_path):
    from lightning.fabric.strategies.fsdp import _is_sharded_checkpoint
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    assert not _is_sharded_checkpoint(folder)  # a folder without the metadata file
    torch.save({}, folder / _METADATA_FILENAME)
    assert _is_sharded_checkpoint(folder)
    torch.save({}, tmp_path / "file.ckpt")
    assert not _is_sharded_checkpoint(tmp_path / "file.ckpt")
    assert not _is_sharded_checkpoint(tmp_path / "missing.ckpt")


def test_lightning_fabric_utilities_load_metadata_filename():
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    assert _METADATA_FILENAME == "meta.pt"  # the name checkpoints written by earlier versions carry


def test_lightning_trainer_logger_connector_should_update_logs(tmp_path):
    """True exactly on the steps whose values the loggers write (every `log_every_n_steps`)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    seen = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            seen.append((self.global_step, self.trainer._logger_connector.should_update_logs))
            loss = self.layer(batch).pow(2).mean()
            self.log("loss", loss, on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    logger = CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(max_steps=7, log_every_n_steps=3, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.randn(7, 2), batch_size=1))
    header, *rows = [row.split(",") for row in (tmp_path / "metrics.csv").read_text().splitlines()]
    written = [int(row[header.index("step")]) for row in rows]
    assert [step for step, update in seen if update] == written == [2, 5]


def test_torch_subclasses_fake_tensor_fake_tensor_mode():
    """Real weights, tensors made inside the mode: shapes propagate, FLOPs are counted, nothing is computed."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    layer = nn.Linear(8, 4)
    weight = layer.weight.detach().clone()
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
        x = torch.zeros(3, 8)
        out = layer(x)
        grads = torch.autograd.grad(out.sum(), [layer.weight, layer.bias])
    assert isinstance(out, FakeTensor) and out.shape == (3, 4) and grads[0].shape == (4, 8)
    assert counter.get_total_flops() == 2 * 3 * 8 * 4 * 2  # forward x @ W.T and the weight gradient, 2·m·n·k each
    assert torch.equal(layer.weight, weight) and not isinstance(layer.weight, FakeTensor)


def test_torch_nn_module_compiled_call_impl():
    """`nn.Module.compile` sets it; with it None the module runs eagerly, and putting it back compiles again."""
    compiles = []

    def backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    class Scale(nn.Module):  # defined here: torch does not trace its own nn layers on their own
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight + 1

    layer = Scale()
    assert layer._compiled_call_impl is None
    layer.compile(backend=backend)
    assert layer._compiled_call_impl is not None
    x = torch.randn(2, 3)
    compiled, layer._compiled_call_impl = layer._compiled_call_impl, None
    eager = layer(x)
    assert not compiles  # eager: nothing traced
    layer._compiled_call_impl = compiled
    torch.testing.assert_close(layer(x), eager)
    assert len(compiles) == 1
    torch._dynamo.reset()


def test_torch_nn_modules_batchnorm_norm_base():
    from torch.nn.modules.batchnorm import _NormBase

    for norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm2d, nn.InstanceNorm3d):
        assert issubclass(norm, _NormBase), norm
    assert not issubclass(nn.GroupNorm, _NormBase) and not issubclass(nn.Conv2d, _NormBase)


def test_torch_foreach_lerp_():
    """In place, per tensor: a <- a + w·(b − a), the EMA update `shadow <- decay·shadow + (1 − decay)·param`."""
    shadow = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]])]
    ids = [id(t) for t in shadow]
    torch._foreach_lerp_(shadow, params, 0.25)
    assert [id(t) for t in shadow] == ids
    torch.testing.assert_close(shadow[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0]))
    torch.testing.assert_close(shadow[1], torch.tensor([[2.5]]))


def test_diffusers_model_mixin_supports_gradient_checkpointing():
    from diffusers import (UNet2DConditionModel, UNet3DConditionModel, UNetSpatioTemporalConditionModel,
                           WanTransformer3DModel)
    from diffusers.models.modeling_utils import ModelMixin

    assert ModelMixin._supports_gradient_checkpointing is False  # the default a denoiser without it keeps
    for model in (UNet2DConditionModel, UNetSpatioTemporalConditionModel, WanTransformer3DModel):
        assert model._supports_gradient_checkpointing is True, model
        assert callable(model.enable_gradient_checkpointing)
    assert hasattr(UNet3DConditionModel, "_supports_gradient_checkpointing")  # its blocks are wrapped by memory.py


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # decode averages the recording hooks' empty scores
def test_imwatermark_embed_dwt_dct_svd_internals():
    """The attributes the batched coder reads, the hooks `encode`/`decode` call per channel, and the package's own
    per-block `encode_frame`/`decode_frame`, which the batched versions must equal."""
    from imwatermark.dwtDctSvd import EmbedDwtDctSvd

    from lifecycle.outputs.watermark import _coder

    bits = [1, 0, 1, 1, 0, 0, 1, 0]
    coder = EmbedDwtDctSvd(watermarks=bits, wmLen=len(bits), scales=[0, 48, 0])
    assert (coder._block, coder._watermarks, coder._wmLen, coder._scales) == (4, bits, 8, [0, 48, 0])

    calls = []

    class Recording(EmbedDwtDctSvd):
        def encode_frame(self, frame, scale):
            calls.append(("encode", frame.shape, scale))

        def decode_frame(self, frame, scale, scores):
            calls.append(("decode", frame.shape, scale))
            return scores

    bgr = np.random.default_rng(0).integers(0, 256, (34, 42, 3), dtype=np.uint8)
    recording = Recording(watermarks=bits, wmLen=len(bits), scales=[0, 48, 0])
    recording.decode(recording.encode(bgr))
    assert calls == [("encode", (16, 20), 48), ("decode", (16, 20), 48)]  # the U channel's Haar band, rows/cols // 4·4

    frame = np.random.default_rng(1).uniform(0, 255, (16, 20))
    theirs, ours = frame.copy(), frame.copy()
    coder.encode_frame(theirs, 48)
    _coder("dwtDctSvd", np.array(bits)).encode_frame(ours, 48)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    empty = [[] for _ in bits]
    assert coder.decode_frame(theirs, 48, [[] for _ in bits]) == _coder("dwtDctSvd", np.array(bits)).decode_frame(
        theirs, 48, empty)


def test_ray_init_temp_dir():
    import inspect

    import ray

    # a keyword ray.init takes from its **kwargs: where a local Ray puts its session folder and sockets
    assert 'kwargs.pop("_temp_dir"' in inspect.getsource(ray.init)
