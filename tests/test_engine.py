import io
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch

from distill_cli.core.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    model_checkpoint,
    save_atomic,
)
from distill_cli.core.config import OptimizerConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo, Split
from distill_cli.data.loader import DeviceLoader
from distill_cli.training.optim import lr_factor


def test_cosine_schedule_with_warmup():
    cfg = OptimizerConfig(schedule="cosine", warmup_epochs=2)
    factors = [lr_factor(cfg, epoch, 10) for epoch in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0  # warm-up ramps to the full rate
    assert all(a >= b for a, b in zip(factors[2:], factors[3:]))  # then decays monotonically
    assert factors[-1] < 0.05


def test_step_schedule_drops_at_milestones():
    cfg = OptimizerConfig(schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    factors = [lr_factor(cfg, epoch, 8) for epoch in range(8)]
    assert factors == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def _split(n=10):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return Split(images, torch.arange(n) % 3)


INFO = DatasetInfo("toy", 3, 1, (2, 2), mean=(0.5,), std=(0.25,), class_names=("a", "b", "c"))


def _image_numbers(batch) -> torch.Tensor:
    """Which images of `_split` a batch holds (each image's pixels are its number)."""
    return ((batch.images[:, 0, 0, 0] * 0.25 + 0.5) * 255).round().long()


def test_loader_shuffles_each_epoch_covering_every_sample_once():
    loader = DeviceLoader(_split(10), INFO, 4, torch.device("cpu"), shuffle=True, seed=1)
    assert len(loader) == 3
    epochs = [list(loader) for _ in range(3)]
    orders = [torch.cat([_image_numbers(batch) for batch in batches]).tolist() for batches in epochs]
    assert all(sorted(order) == list(range(10)) for order in orders)  # every sample once per epoch
    assert all(torch.equal(batch.labels, _image_numbers(batch) % 3) for batch in epochs[0])  # labels follow
    assert orders[0] != list(range(10))  # shuffled
    assert orders[0] != orders[1] != orders[2] != orders[0]  # a new order each epoch


def test_loader_order_depends_only_on_seed():
    def order(seed):
        loader = DeviceLoader(_split(10), INFO, 10, torch.device("cpu"), shuffle=True, seed=seed)
        return [next(iter(loader))[0][:, 0, 0, 0].tolist() for _ in range(2)]

    torch.manual_seed(123)  # the global RNG does not affect the data order
    a = order(5)
    torch.manual_seed(456)
    assert order(5) == a
    assert order(6) != a


def test_loader_drop_last_and_normalisation():
    loader = DeviceLoader(_split(10), INFO, 4, torch.device("cpu"), drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    images = batches[0].images
    assert images.dtype == torch.float32
    expected = (torch.tensor([0.0, 1, 2, 3]) / 255 - 0.5) / 0.25
    assert torch.allclose(images[:, 0, 0, 0], expected)


def test_atomic_save_roundtrip_leaves_no_temp_files(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / "best.pt"
    save_atomic(model_checkpoint(model, "linear", {}, 2, epoch=1), path)
    save_atomic(model_checkpoint(model, "linear", {}, 2, epoch=2), path)  # replaces in place
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 2 and checkpoint["format_version"] == FORMAT_VERSION
    assert torch.equal(checkpoint["state_dict"]["weight"], model.weight.detach())


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"arch": "mlp", "state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(DistillError, match=r"evil.pt is not a checkpoint distill can load safely: it holds a pickled Python object"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def _zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _numpy_array() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


NOT_CHECKPOINTS = {  # what a file holds -> what the one line says about it, after "<path> is not ..."
    "text": (b"hello, these are notes\nnot weights\n", "a checkpoint distill can load: it is text, beginning 'hello, these are notes not weights'"),
    "text starting with c": (b"checkpoints: see the wiki", "a checkpoint distill can load: it is text, beginning 'checkpoints: see the wiki'"),
    "git lfs pointer": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "a checkpoint distill can load: it is a Git LFS pointer"),
    "web page": (b"<!DOCTYPE html><html></html>", "a checkpoint distill can load: it is an HTML page"),
    "numpy": (_numpy_array(), "a checkpoint distill can load: it is a NumPy array (numpy.save)"),
    "python pickle": (pickle.dumps({"w": 1}, protocol=4), "a checkpoint distill can load: it is a Python pickle (pickle.dump)"),
    "other zip": (_zip({"a.txt": "hi"}), "a checkpoint distill can load: it is a zip archive torch.save did not write"),
    "torch.export": (_zip({"m/archive_format": "pt2", "m/models/model.json": "{}"}), "a checkpoint distill can load: it is a torch.export program"),
    "whole module": (_saved(torch.nn.Linear(2, 2)), "a checkpoint distill can load safely: it holds a pickled Python object (torch.nn.modules.linear.Linear)"),
    "state_dict": (_saved(torch.nn.Linear(2, 2).state_dict()), "a distill model checkpoint: it holds 2 tensors by name (a state_dict alone)"),
    "trainer state": (_saved({"model": {}, "epoch": 3}), "a distill model checkpoint: it holds a dict with keys model, epoch,"),
}


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_a_file_that_is_not_a_checkpoint_is_named_and_said_what_it_is_in_one_line(kind, tmp_path):
    content, says = NOT_CHECKPOINTS[kind]
    path = tmp_path / "teacher.pt"
    path.write_bytes(content)
    with pytest.raises(DistillError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path} is not {says}") and "\n" not in message
    assert not re.search("weights_only. argument|Re-running|PyTorch 2.6", message)  # torch's advice to load it unsafely


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(model_checkpoint(torch.nn.Linear(50, 50), "linear", {}, 50), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DistillError, match="cannot load checkpoint"):
        load_checkpoint(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(DistillError, match="not a distill model checkpoint"):
        load_checkpoint(other)
    with pytest.raises(DistillError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DistillError):
        load_checkpoint(plain)
