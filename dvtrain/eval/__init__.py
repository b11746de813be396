"""Evaluation of frozen backbones: k-NN and linear probes (DINOv2 protocols, dinov2/eval/).

Main entry points: `knn_eval_features` / `knn_eval_backbone` (dvtrain.eval.knn),
`train_linear_probes` / `linear_eval_backbone` (dvtrain.eval.linear), `extract_features` and
`make_eval_loader` (dvtrain.eval.features). The CLI lives in dvtrain.eval.commands.
"""

from dvtrain.eval.features import Features, extract_features, make_eval_loader
from dvtrain.eval.knn import knn_eval_backbone, knn_eval_features
from dvtrain.eval.linear import linear_eval_backbone, train_linear_probes

__all__ = [
    "Features",
    "extract_features",
    "knn_eval_backbone",
    "knn_eval_features",
    "linear_eval_backbone",
    "make_eval_loader",
    "train_linear_probes",
]
