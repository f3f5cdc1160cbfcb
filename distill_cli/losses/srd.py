"""Softmax regression representation learning (Yang et al. 2021, "Knowledge Distillation via Softmax
Regression Representation Learning", SRD): the student's penultimate feature is judged by the teacher's own
classifier. The student's last stage output goes through a connector (1x1 conv + BatchNorm + ReLU) to the
teacher's embedding width and is average-pooled to f_s; with f_t the teacher's pooled feature and
(W, b) the teacher's final Linear layer (a frozen copy),

    srd_feature = feature_weight * mean over (b, c) of (f_s - f_t)^2
    srd_logits  = logit_weight * mean over (b, k) of (W f_s + b - teacher logits)^2

Defaults as the authors' CIFAR-100 code (jingyang2017/SRD_ossl, `--distill srd -a 0 -b 1` for the
resnet8x4 and wrn_40_1 students): both weights 1, CE weight 1 (their ShuffleNetV1 runs weight the
feature term 10). The connector's input is the student's deepest stage; the teacher's pooled feature is
what its classifier reads (the mean of its last stage map for the ResNets and WRNs the authors used).
"""

from __future__ import annotations

import torch.nn.functional as F

from ..core.errors import DistillError
from ..models.features import classifier, stage_points
from . import LOSSES
from .base import Method, MethodContext, non_negative
from .fitnet import conv_connector


@LOSSES.register("srd")
class SRD(Method):
    """Student feature (connector, pooled) vs the teacher's, and through the teacher's classifier vs its logits."""

    def __init__(self, feature_weight: float = 1.0, logit_weight: float = 1.0):
        super().__init__()
        non_negative("loss.feature_weight", feature_weight)
        non_negative("loss.logit_weight", logit_weight)
        self.feature_weight = feature_weight
        self.logit_weight = logit_weight
        self.student_points = ("last_stage",)
        self.teacher_points = ("pooled",)

    def setup(self, context: MethodContext) -> None:
        head = classifier(context.teacher_network) if context.teacher_network is not None else None
        if head is None:
            raise DistillError("loss=srd: the teacher has no final Linear classifier reading its pooled feature")
        student_channels = context.student[stage_points(context.student)[-1]][0]
        self.connector = conv_connector(student_channels, head.in_features)
        # a frozen copy of the teacher's classifier: buffers, never trained, saved with the method
        self.register_buffer("classifier_weight", head.weight.detach().float().clone())
        self.register_buffer("classifier_bias", head.bias.detach().float().clone() if head.bias is not None else None)

    def forward(self, student, teacher, batch, epoch):
        student_map = student.features[stage_points(student.features)[-1]].float()
        feature = self.connector(student_map).float().mean(dim=(2, 3))
        logits = F.linear(feature, self.classifier_weight, self.classifier_bias)
        return {
            "srd_feature": self.feature_weight * F.mse_loss(feature, teacher.features["pooled"].float()),
            "srd_logits": self.logit_weight * F.mse_loss(logits, teacher.logits.float()),
        }
