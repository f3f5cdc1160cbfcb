"""timm as a model family (`teacher=timm teacher.kwargs.name=...`): any classifier, untrained or from a local
file, feature points from timm's feature API, a CNN teacher with a ViT student for logit methods, and
one-line refusals (downloads, images a ViT does not take, token sequences for feature methods)."""

import pytest
import torch
from conftest import small_kd_config

from distill_cli.core.config import DatasetConfig, ModelConfig, TeacherConfig
from distill_cli.core.errors import DistillError
from distill_cli.data import DatasetInfo
from distill_cli.models import build_model
from distill_cli.models.checkpoints import checked_checkpoint, checked_model
from distill_cli.models.features import feature_points
from distill_cli.runs.kd import run_kd

timm = pytest.importorskip("timm")

DIGITS = DatasetInfo("digits", 10, 1, (8, 8), (0.5,), (0.5,), tuple(map(str, range(10))))
CNN = ModelConfig("timm", {"name": "resnet10t"}, name="timm")
# a ViT for 8x8 digits: 2x2 patches, one block of width 32
VIT = ModelConfig("timm", {"name": "vit_tiny_patch16_224", "model_args": {"img_size": 8, "patch_size": 2, "depth": 1, "embed_dim": 32, "num_heads": 2}}, name="timm")


def test_a_timm_model_gets_the_datasets_channels_classes_and_timms_feature_points():
    model = build_model(CNN, DIGITS, "teacher")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    stages = {point: node for point, node in feature_points(model, DIGITS).items() if point.startswith("stage")}
    assert list(stages.values()) == [entry["module"] for entry in model.feature_info] == ["act1", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "resnet18", "pretrained": True}, r"^pretrained=true: timm would download resnet18's weights, and distill runs offline"),
        ({"name": "resnet18", "pretrained": True, "pretrained_file": "nowhere.pth"}, r"^pretrained_file=nowhere.pth: no such file$"),
        ({"name": "resnet_18"}, r"^unknown timm model 'resnet_18': did you mean"),
        ({"name": "vit_tiny_patch16_224"}, r"^teacher.kwargs name=vit_tiny_patch16_224: make no timm network \(it does not take the dataset's 8x8 images: "),
    ],
)
def test_what_timm_cannot_build_here_is_one_line(kwargs, message):
    with pytest.raises(DistillError, match=message):
        build_model(ModelConfig("timm", kwargs), DIGITS, "teacher")


def test_a_local_pretrained_file_and_a_timm_state_dict_as_teacher_checkpoint(tmp_path):
    torch.manual_seed(0)
    trained = timm.create_model("resnet10t", num_classes=10, in_chans=1).eval()
    path = tmp_path / "resnet10t.pth"
    torch.save(trained.state_dict(), path)
    images = torch.randn(2, 1, 8, 8)
    teacher = TeacherConfig("timm", {"name": "resnet10t"}, name="timm", checkpoint=str(path))
    loaded = checked_model(checked_checkpoint(path, teacher, "teacher", DIGITS), teacher, "teacher", path, DIGITS)
    with torch.no_grad():
        assert torch.allclose(loaded(images), trained(images), atol=1e-5)
    # timm's own loading of a local file: the body kept, the classifier made for 3 classes
    three = DatasetInfo("digits", 3, 1, (8, 8), (0.5,), (0.5,), ("a", "b", "c"))
    pretrained = build_model(ModelConfig("timm", {"name": "resnet10t", "pretrained": True, "pretrained_file": str(path)}), three, "teacher")
    assert torch.equal(pretrained.conv1[0].weight, trained.conv1[0].weight) and pretrained.fc.out_features == 3


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dkd", "ofa"])
def test_a_cnn_teacher_distils_a_vit_student_with_a_logit_method(tmp_path, quiet_results, loss):
    """The quick cnn teacher of `small_kd_config` (a conv net of width 8) and a one-block ViT, DKD, or OFA with an exit
    on the ViT's block, an epoch each on 200 synthetic 8x8 images."""
    data = DatasetConfig(name="synthetic", num_classes=10, channels=1, image_size=8, train_size=200, test_size=50)
    cfg = small_kd_config(tmp_path, student=VIT, loss={"name": loss}, epochs=1, teacher_epochs=1, baseline=False, dataset=data)
    summary = run_kd(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and 0 <= summary["student"]["test_acc_best"] <= 1


def test_a_feature_method_refuses_a_vits_token_sequences_in_one_line(tmp_path):
    cfg = small_kd_config(tmp_path, teacher=TeacherConfig(CNN.arch, CNN.kwargs, name="timm"), student=VIT, loss={"name": "at"})
    with pytest.raises(DistillError, match=r"^loss=at: student=timm's stage1 is \(17, 32\), not a feature map \(channels, height, width\)"):
        run_kd(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()
