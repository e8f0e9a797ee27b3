"""A plain Flower 1.41 FedAvg + peft app: the reference fedpeft is measured against.

What users write today, FlowerTune style (FLOWER.md §12): the server sends the peft
adapter state dict (LoRA A/B and the classifier head, ``get_peft_model_state_dict``)
in an ``ArrayRecord``; Flower's own ``flwr.serverapp.strategy.FedAvg`` (McMahan et al.,
AISTATS 2017) averages the replies by ``num-examples``; the ClientApp loads the
adapter with ``set_peft_model_state_dict`` and trains it with a plain torch AdamW
loop; the ServerApp evaluates every round on the held-out test set.

Nothing from fedpeft's strategies, aggregation, codecs, client algorithms or Flower
layer is used. One thing is shared on purpose: the *data* (tokenised tweets, the
seeded 2,000-tweet test set and the client partitions) comes from ``fedpeft.tasks``,
so both implementations see identical examples and splits; any difference in the
results comes from the federated-learning code, not from the data pipeline.

Modules: :mod:`reference_app.task` (config, model, data, train and evaluate loops),
:mod:`reference_app.client_app`, :mod:`reference_app.server_app` and
:mod:`reference_app.run` (``python -m reference_app.run CONFIG.json`` with
``simulations/`` on ``PYTHONPATH``, which ``simulations/bench_reference.py`` does).
"""
