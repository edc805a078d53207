"""Fine-tuning VILA-M3 on the data engine's conversations, and the demo model built that way.

* :mod:`.examples`: records -> token ids with loss labels on the assistant turns, images;
* :mod:`.trainer`: :func:`~.trainer.fine_tune` with transformers' Trainer (one CPU to many GPUs);
* :mod:`.evaluation`: trigger accuracy (right expert and argument, false calls) and answer accuracy;
* :mod:`.versions`: the fine-tuned versions a server keeps and serves;
* :mod:`.demo`: the demo model, trained by this pipeline on synthetic studies.

Heavy imports (transformers' Trainer) happen in the submodules, not here.
"""
