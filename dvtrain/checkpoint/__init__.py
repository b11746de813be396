"""Run state: the checkpoint layout, the checkpointer, and offline backbone loading.

- :mod:`dvtrain.checkpoint.layout`: every file and key of a training checkpoint (one definition).
- :mod:`dvtrain.checkpoint.atomic`: atomic directories, crash recovery, retention, atomic JSON.
- :mod:`dvtrain.checkpoint.manager`: :class:`Checkpointer` over stateful parts (training).
- :mod:`dvtrain.checkpoint.rng`: RNG states as a part.
- :mod:`dvtrain.checkpoint.partition`: ZeRO-3 partitions -> full tensors (engine and offline).
- :mod:`dvtrain.checkpoint.backbone`: load a backbone from any checkpoint format (eval/export/viz).
"""
